"""The exceptions avgfn raises when an averaging round cannot be completed.

Every one of them is raised before the round returns, so the caller's params
and state are exactly as they were (unless it donated them): it can save a
checkpoint, rebuild its process group, and continue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from typing_extensions import Self


class AveragingError(RuntimeError):
    """An averaging round failed; the inputs of ``update`` are unchanged.

    Attributes:
      step: the step of the round, when the averager knew it, else ``None``.
    """

    step: Optional[int] = None

    def at_step(self, step: int) -> Self:
        """A copy of this error that names ``step`` (the averagers add it)."""
        if self.step is not None:
            return self
        args = list(self.args)
        if args and isinstance(args[0], str):
            args[0] = f"at step {step}: {args[0]}"
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.args = tuple(args)
        copy.step = step
        return copy


class PeerError(AveragingError):
    """A collective failed: a peer died, stalled past the timeout, or the group broke.

    Attributes:
      group: a description of the process group.
      timeout: the timeout in seconds that applied, or ``None``.
    """

    def __init__(self, message: str, *, group: str = "", timeout: Optional[float] = None) -> None:
        super().__init__(message)
        self.group = group
        self.timeout = timeout


class NonFiniteError(AveragingError, FloatingPointError):
    """A replica's params hold NaN or infinity: nothing was averaged.

    Attributes:
      paths: the pytree paths of this replica's non-finite leaves (empty on a
        healthy replica that learned that a peer is not).
    """

    def __init__(self, message: str, *, paths: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.paths = paths


class ReplicaMismatchError(AveragingError, ValueError):
    """The replicas of a group do not run the same round: other params, values, steps or options.

    Also raised on the peers of a replica that refused the round because of
    its own inputs (that replica raises its own ``TypeError`` or
    ``ValueError``).

    Attributes:
      refused_by: the ranks that refused the round because of their own
        inputs (the message names the first and its error); empty when the
        replicas only hold different params. Over a torchft quorum it
        holds the participating rank of one refusing participant.
      differs: what differs between the first two replicas that disagree,
        as the message names it: ``"refused"`` (a replica refused its own
        inputs), ``"step"`` (their schedules are out of step), ``"leaves"``
        (other paths, shapes, dtypes or devices), ``"round"`` (another
        averager, other round options, or another state), ``"values"``
        (the check of values at init or at an outer step's first round),
        ``"order"``; ``""`` where the group cannot tell (a torchft quorum,
        whose participants do not exchange their entries).
    """

    refused_by: tuple[int, ...] = ()
    differs: str = ""


class RoundNotCommitted(AveragingError):
    """The group completed a round's collectives but did not keep the round.

    A group that votes on its rounds (a torchft quorum, where a replica was
    lost mid-round) may decline one; the inputs of ``update`` are unchanged
    (unless the round donated them).
    """
