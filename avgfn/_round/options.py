"""The options of an averaging round, declared once: [`Round`][avgfn.Round].

Every averager takes one ``round=avgfn.Round(...)`` value instead of
re-declaring these options in its signature. The record validates itself
when it is built, so a bad option fails where it is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import attrs
import torch

from avgfn._core.checks import check_int

NONFINITE = ("raise", "skip", "exclude", "ignore")
"""The one vocabulary of non-finite policies (each averager accepts a subset):

* ``"raise"``: every replica raises [`avgfn.NonFiniteError`][avgfn.NonFiniteError] and nothing
  changes (under ``vmap`` or ``torch.compile``, where a value cannot stop the
  program, the round is skipped instead).
* ``"skip"``: the round is skipped on every replica: what the replicas share
  (the params' average, a global copy, an outer state) keeps its old value,
  and the state counts the round where it has a ``skipped`` counter.
* ``"exclude"``: the healthy replicas average among themselves and every
  replica receives their mean (one extra small collective).
* ``"ignore"``: no check (torch's behaviour).
"""

VERIFY = ("structure", "values", None)
_WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTO = "auto"


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Round: {name} must be a bool, got {type(value).__name__} {value!r}")


@attrs.frozen
class Round:
    """How an averaging round runs: one validated value, passed whole to any averager.

    Args:
      donate: ``update`` consumes the params it is given and may write the
        average into them (no allocation when they tile one storage); the
        caller must use the returned params. In a group of two, a round
        whose check can travel in its data (at most 2**23 elements, see
        ``docs/round.md``) runs as the pure round does instead, one
        collective, and leaves them unwritten (see ``docs/performance.md``).
      bucket_bytes: stage at most this many bytes at a time (two buffers of
        half the size, one packed while the other is on the wire), ``>= 16``.
      comm_dtype: the dtype the Reduce sees (``torch.bfloat16`` halves the
        bytes); results are cast back to each leaf's dtype. A value that
        overflows the wire dtype is caught by the non-finite policy.
      error_feedback: with ``comm_dtype``, carry each round's rounding error
        into the next (kept in the state's ``residual``).
      nonfinite: the non-finite policy, one of ``"raise"``, ``"skip"``,
        ``"exclude"``, ``"ignore"`` (see ``docs/failures.md``); each averager
        says which it accepts.
      verify: what the replicas must agree on at the start of training:
        ``"structure"`` (paths, shapes, dtypes, checked at ``init``),
        ``"values"`` (also identical values: of the params at ``init``; the
        outer-step averagers compare their global copy instead, at their
        first round, so that a resume can build its template from
        mid-period params), ``None``, or ``"auto"`` (the averager's own
        default).
      agree: before any value is mixed, the replicas of the group check that
        they average the same leaves (paths, shapes, dtypes of the selection)
        at the same step: one extra collective of four int64 per round
        through a group-backed Reduce (in a group of two, once its rounds
        repeat, 18 numbers appended to the data collective instead; see
        ``docs/round.md``). ``False`` turns it off.

    Examples:
      >>> import torch, avgfn
      >>> fast = avgfn.Round(comm_dtype=torch.bfloat16, bucket_bytes=1 << 24)
      >>> avg = avgfn.periodic(4, reduce=lambda t: t, round=fast)
      >>> avgfn.Round(nonfinite="drop")
      Traceback (most recent call last):
      ...
      ValueError: Round: nonfinite must be one of ('raise', 'skip', 'exclude', 'ignore'), got 'drop'
    """

    donate: bool = False
    bucket_bytes: Optional[int] = None
    comm_dtype: Optional[torch.dtype] = None
    error_feedback: bool = False
    nonfinite: str = "raise"
    verify: Optional[str] = _AUTO
    agree: bool = True

    def __attrs_post_init__(self) -> None:
        _check_bool("donate", self.donate)
        _check_bool("error_feedback", self.error_feedback)
        _check_bool("agree", self.agree)
        if self.bucket_bytes is not None:
            object.__setattr__(self, "bucket_bytes", check_int("Round: bucket_bytes", self.bucket_bytes, minimum=16))
        if self.comm_dtype is not None and self.comm_dtype not in _WIRE_DTYPES:
            raise TypeError(
                f"Round: comm_dtype must be None or one of {[str(d) for d in _WIRE_DTYPES]}, "
                f"got {self.comm_dtype!r}"
            )
        if self.error_feedback and self.comm_dtype is None:
            raise ValueError("Round: error_feedback=True needs a comm_dtype (e.g. torch.bfloat16)")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"Round: nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        if self.verify not in VERIFY + (_AUTO,):
            raise ValueError(f"Round: verify must be one of {VERIFY + (_AUTO,)}, got {self.verify!r}")

    @property
    def plain_wire(self) -> bool:
        """No donation, buckets or wire dtype: the round copies into one fresh buffer."""
        return not self.donate and self.bucket_bytes is None and self.comm_dtype is None


DEFAULT = Round()

ROUND_OPTIONS = tuple(f.name for f in attrs.fields(Round))


def round_options(
    who: str,
    round: Optional[Round],
    legacy: Mapping[str, Any],
    *,
    nonfinite: Sequence[str],
    verify: Optional[str] = "structure",
    allowed: Sequence[str] = ROUND_OPTIONS,
    stacklevel: int = 3,
) -> Round:
    """The [`Round`][avgfn.Round] an averager ``who`` runs with, checked against what it supports.

    ``legacy`` holds options passed as keywords of the factory (their spelling
    before [`Round`][avgfn.Round]): they still work, with a ``DeprecationWarning``, and
    may not be mixed with ``round``. ``nonfinite`` lists the policies ``who``
    accepts, ``verify`` its default check at ``init``, ``allowed`` the
    options it honours (another option set away from its default is refused).
    """
    if round is not None and not isinstance(round, Round):
        raise TypeError(f"{who}: round must be an avgfn.Round, got {type(round).__name__} {round!r}")
    if legacy:
        unknown = sorted(set(legacy) - set(ROUND_OPTIONS))
        if unknown:
            raise TypeError(f"{who}() got unexpected keyword argument(s) {unknown}")
        if round is not None:
            raise TypeError(f"{who}: pass the round options in round=avgfn.Round(...) only, not also as {sorted(legacy)}")
        spelled = ", ".join(f"{k}={v!r}" for k, v in legacy.items())
        warnings.warn(
            f"{who}({', '.join(sorted(legacy))}=...) is deprecated: pass round=avgfn.Round({spelled})",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        round = Round(**legacy)
    round = DEFAULT if round is None else round
    for name in ROUND_OPTIONS:
        if name not in allowed and getattr(round, name) != getattr(DEFAULT, name):
            raise ValueError(f"{who}: the round option {name}={getattr(round, name)!r} is not supported here")
    if round.nonfinite not in nonfinite:
        raise ValueError(
            f"{who}: nonfinite must be one of {tuple(nonfinite)} for this averager, got {round.nonfinite!r}"
        )
    if round.verify == _AUTO:
        round = attrs.evolve(round, verify=verify)
    return round
