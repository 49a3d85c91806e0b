"""Non-finite params: never average a NaN into healthy replicas.

A NaN or infinity in any replica makes the group's mean non-finite at the
same place, on every replica. The policies use that:

* ``"raise"`` (default): the mean is checked before it is returned; if it is
  not finite, every replica raises :class:`avgfn.NonFiniteError` naming the
  leaves (and saying whether this replica's own values are the cause), and
  its params and state stay as they were. It costs one pass over the result
  and no extra collective. A donating round writes results into the params
  as they arrive, so with ``donate=True`` the replicas first exchange one
  small health flag, as ``"exclude"`` does, and raise before any data moves.
* ``"exclude"``: before the data, the replicas exchange a small health flag
  through the round's own Reduce (one extra small collective); the healthy
  replicas then average among themselves (an unhealthy replica sends zeros
  and the mean is rescaled by the healthy fraction), and every replica, the
  unhealthy ones included, receives that mean. If no replica is healthy, it
  raises as ``"raise"`` does.
* ``"ignore"``: no check at all (torch's behaviour).

Under ``torch.func.vmap`` or ``torch.compile`` a value cannot stop the
program: there ``"raise"`` keeps each replica's old values wherever the mean
is not finite (per leaf), and ``"exclude"`` computes the exclusion with
``torch.where`` (leaving the params as they were when no replica is healthy).
With every replica healthy, both give the bits of the plain mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from avgfn._base import Reduce
from avgfn._errors import NonFiniteError
from avgfn._wire import batched

POLICIES = ("raise", "exclude", "ignore")


def check_policy(nonfinite: Any) -> str:
    """Validate the ``nonfinite`` argument."""
    if nonfinite not in POLICIES:
        raise ValueError(f"nonfinite must be one of {POLICIES}, got {nonfinite!r}")
    return nonfinite


def traced(leaf: torch.Tensor) -> bool:
    """True under a torch.func transform or while torch.compile traces."""
    return torch.compiler.is_compiling() or batched(leaf)


def _extremes(t: torch.Tensor) -> torch.Tensor:
    """A small tensor that is finite exactly when ``t`` is.

    ``aminmax`` reads ``t`` once and allocates two numbers (a NaN makes both
    NaN, an infinity shows in one of them); ``isfinite(t).all()`` would first
    allocate a bool tensor as large as ``t``. Complex tensors take that path.
    """
    if t.is_complex():
        return torch.where(torch.isfinite(t).all(), 0.0, float("nan")).reshape(1)
    low, high = torch.aminmax(t.detach())
    return torch.stack([low, high]).to(torch.float64)


def finite(leaves: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every leaf is finite."""
    checks = [
        _extremes(leaf)
        for leaf in leaves
        if (leaf.is_floating_point() or leaf.is_complex()) and leaf.numel()
    ]
    if not checks:
        return torch.ones((), dtype=torch.bool, device=leaves[0].device)
    return torch.isfinite(torch.cat(checks)).all()


class Watch:
    """Collects the extremes of a round's reduced buffers, to check them at once.

    The eager ``"raise"`` check: one read of each buffer and a single
    host sync at the end (:meth:`finite`), instead of a pass per leaf.
    """

    __slots__ = ("extremes",)

    def __init__(self) -> None:
        self.extremes: list[torch.Tensor] = []

    def add(self, buffer: torch.Tensor) -> None:
        """Note the extremes of one reduced buffer."""
        if buffer.numel() and (buffer.is_floating_point() or buffer.is_complex()):
            self.extremes.append(_extremes(buffer))

    def finite(self) -> bool:
        """Whether every buffer noted so far was finite."""
        if not self.extremes:
            return True
        return bool(torch.isfinite(torch.cat([e.to("cpu") for e in self.extremes])).all())


class Plan:
    """What the round does around its data collective.

    Attributes:
      reduce: the Reduce for the data (rescaled when excluding).
      mask: ``None``, or a 0-d bool tensor: this replica's leaves are to be
        replaced by zeros before they are sent (excluding).
      keep: ``None``, or a 0-d bool tensor: keep the old values (no healthy
        replica, under a transform).
      check: the result must be checked before it is returned (``"raise"``).
    """

    __slots__ = ("reduce", "mask", "keep", "check")

    def __init__(self, reduce: Reduce, mask: Any = None, keep: Any = None, check: bool = False) -> None:
        self.reduce = reduce
        self.mask = mask
        self.keep = keep
        self.check = check


def _rescaled(reduce: Reduce, healthy: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce_healthy(tensor: torch.Tensor) -> torch.Tensor:
        return reduce(tensor) / healthy.to(tensor.dtype)

    return reduce_healthy


def _error(policy: str, local: list[str], result: list[str]) -> NonFiniteError:
    if local:
        where = f"this replica holds non-finite values at {', '.join(local)}"
    elif result:
        where = (
            f"the group's mean is non-finite at {', '.join(result)}: a peer replica holds "
            "non-finite values there (or they overflowed the wire dtype)"
        )
    else:
        where = "a peer replica holds non-finite values"
    return NonFiniteError(f"{where}; nothing was averaged (nonfinite={policy!r})", paths=tuple(local))


def plan(
    leaves: list[torch.Tensor],
    reduce: Reduce,
    policy: str,
    donate: bool,
    bad_paths: Callable[[], list[str]],
) -> Plan:
    """Decide the round before its data moves (see the module docstring)."""
    if policy == "ignore":
        return Plan(reduce)
    if policy == "raise" and not donate:
        return Plan(reduce, check=True)
    ok = finite(leaves)
    flags = torch.stack([~ok, ok]).to(torch.float32)
    means = reduce(flags)
    if not isinstance(means, torch.Tensor) or means.shape != flags.shape:
        raise ValueError(
            f"reduce must return a tensor shaped like its input (2,), got {getattr(means, 'shape', means)!r}"
        )
    unhealthy, healthy = means[0], means[1]
    if traced(leaves[0]):
        return Plan(_rescaled(reduce, healthy), mask=ok, keep=healthy <= 0)
    if float(unhealthy) <= 0:
        return Plan(reduce)
    if policy == "raise" or float(healthy) <= 0:
        raise _error(policy, [] if bool(ok) else bad_paths(), [])
    return Plan(_rescaled(reduce, healthy), mask=ok)


def check_result(
    policy: str,
    originals: list[torch.Tensor],
    averaged: list[torch.Tensor],
    watch: Optional[Watch],
    bad_paths: Callable[[], list[str]],
    result_paths: Callable[[list[bool]], list[str]],
) -> list[torch.Tensor]:
    """``"raise"``: refuse a non-finite mean (eager) or keep the old values (traced).

    Eagerly, ``watch`` holds the extremes of the reduced buffers; the leaves
    are only looked at one by one to name them in the error.
    """
    if watch is None:
        out = []
        for old, new in zip(originals, averaged):
            if new.is_floating_point() or new.is_complex():
                new = torch.where(torch.isfinite(new).all(), new, old.detach().to(new.dtype))
            out.append(new)
        return out
    if watch.finite():
        return averaged
    flags = [not bool(finite([value])) for value in averaged]
    raise _error(policy, bad_paths(), result_paths(flags))
