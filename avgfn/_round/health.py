"""Non-finite params: never average a NaN (or a wire overflow) into healthy replicas.

A NaN or infinity in any replica makes the group's mean non-finite at the
same place, on every replica; so does a value too large for a reduced
precision wire (``Round(comm_dtype=torch.float16)``). The policies of
`avgfn._round.options.NONFINITE` use that:

* ``"raise"``: the mean is checked before it is returned; if it is not
  finite, every replica raises [`avgfn.NonFiniteError`][avgfn.NonFiniteError] naming the
  leaves, and its params and state stay as they were. No extra collective.
  A donating round writes results into the params as they arrive, so with
  ``donate=True`` the replicas first exchange one small health flag (which
  counts a value past the wire dtype's range as unhealthy) and raise before
  any data moves (unless the round runs as a pure one: see
  `avgfn._round.engine`).
* ``"skip"``: as ``"raise"``, but every replica returns its params unchanged
  instead of raising.
* ``"exclude"``: the replicas first exchange the health flag; the healthy
  ones average among themselves (an unhealthy replica sends zeros and the
  mean is rescaled by the healthy fraction) and every replica receives
  that mean. With no healthy replica it raises. The mean is checked too.
* ``"ignore"``: no check at all (torch's behaviour).

Under ``torch.func.vmap`` or ``torch.compile`` a value cannot stop the
program: there ``"raise"`` and ``"skip"`` keep each replica's old values
wherever the mean is not finite (per leaf), and ``"exclude"`` computes the
exclusion with ``torch.where``. With every replica healthy, every policy
gives the bits of the plain mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from avgfn._core import types as _types
from avgfn._core.checks import check_reduced
from avgfn._core.errors import NonFiniteError
from avgfn._core.types import Reduce
from avgfn._core.traced import traced
from avgfn._round import sharded as _sharded

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


def _one_span(leaves: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 1-D view over ``leaves`` when they tile one storage in order (a donated round's do)."""
    first = leaves[0]
    if len(leaves) < 2 or not first.is_floating_point() or traced(first):
        return None
    dtype, storage, start = first.dtype, first.untyped_storage().data_ptr(), first.storage_offset()
    expected = start
    for leaf in leaves:
        if leaf.numel() == 0:
            continue
        if (
            leaf.dtype != dtype
            or not leaf.is_contiguous()
            or leaf.storage_offset() != expected
            or leaf.untyped_storage().data_ptr() != storage
        ):
            return None
        expected += leaf.numel()
    return first.new_empty(0).set_(first.untyped_storage(), start, (expected - start,), (1,))


def finite(leaves: list[torch.Tensor], limit: Optional[float] = None) -> torch.Tensor:
    """A 0-d bool tensor: every element of every leaf is finite (and within ``limit``).

    ``limit`` is the largest magnitude the wire dtype holds (after the
    division by the group size): a value past it would arrive as infinity.
    Leaves that tile one storage are read in one pass; a DTensor leaf is
    judged by its local shard (no communication).
    """
    # it reads them: a mean still in flight is waited for here (it has no storage to tile)
    leaves = [_types.settle(_sharded.local(leaf)) for leaf in leaves]
    return _judge(_extremes_of(leaves), leaves, limit)


def _extremes_of(leaves: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The extremes of every floating-point leaf, in one float64 tensor (``None``: no such leaf)."""
    span = _one_span(leaves)
    checks = [
        _extremes(leaf)
        for leaf in ([span] if span is not None else leaves)
        if (leaf.is_floating_point() or leaf.is_complex()) and leaf.numel()
    ]
    return torch.cat(checks) if checks else None


def _judge(values: Optional[torch.Tensor], leaves: list[torch.Tensor], limit: Optional[float]) -> torch.Tensor:
    if values is None:
        return torch.ones((), dtype=torch.bool, device=leaves[0].device)
    ok = torch.isfinite(values).all()
    if limit is not None:
        ok = ok & (values.abs() <= limit).all()
    return ok


def _roomy(values: Optional[torch.Tensor], leaves: list[torch.Tensor], limit: Optional[float]) -> torch.Tensor:
    """Whether the sum of the group's pre-divided shares cannot overflow.

    Each replica's share is at most ``max / 2 / W`` (rounding included, a
    hair more) when its values are at most half the wire's largest value
    (``limit`` on a narrower wire, else the leaves' dtype's), so the sum of
    ``W`` shares stays finite: a mean the peers agreed was healthy need not
    be read again. Past half the mean is checked.
    """
    device = leaves[0].device
    if values is None or any(leaf.is_complex() for leaf in leaves):
        return torch.zeros((), dtype=torch.bool, device=device)
    if limit is not None:
        half = limit / 2
    else:
        half = min(torch.finfo(leaf.dtype).max for leaf in leaves if leaf.is_floating_point()) / 2
    return (values.abs() <= half).all()


class Watch:
    """Collects a cheap finiteness test of a round's reduced buffers, to check them at once.

    The eager ``"raise"`` check: one read of each buffer and a single host
    sync at the end (`finite()`), instead of a pass per leaf. The test is a
    sum (the cheapest read of a buffer): a NaN or an infinity makes it non-finite.
    A sum of finite values can overflow too, so a buffer whose sum is not
    finite is judged again by its extremes before the round is refused.
    """

    __slots__ = ("buffers", "sums")

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.sums: list[torch.Tensor] = []

    def add(self, buffer: torch.Tensor) -> None:
        """Note one reduced buffer."""
        if not buffer.numel() or not (buffer.is_floating_point() or buffer.is_complex()):
            return
        self.buffers.append(buffer)
        if buffer.is_complex() or buffer.dtype == torch.float16:  # a float16 sum overflows too soon
            self.sums.append(_extremes(buffer).sum().reshape(1))  # one number per buffer, as below
        else:  # (bfloat16 sums in float32 and has its range)
            self.sums.append(buffer.detach().sum().reshape(1).to(torch.float64))

    def finite(self) -> bool:
        """Whether every buffer noted so far was finite."""
        if not self.sums:
            return True
        ok = torch.isfinite(torch.cat(self.sums).to("cpu"))
        if bool(ok.all()):
            return True
        over = [buf for buf, fine in zip(self.buffers, ok.tolist()) if not fine]
        return bool(torch.isfinite(torch.cat([_extremes(buf).to("cpu") for buf in over])).all())


class Plan:
    """What the round does around its data collective.

    Attributes:
      reduce: the Reduce for the data (rescaled when excluding).
      mask: ``None``, or a 0-d bool tensor: this replica's leaves are to be
        replaced by zeros before they are sent (excluding).
      keep: ``None``, or a 0-d bool tensor: keep the old values (no healthy
        replica, under a transform).
      check: the result must be checked before it is returned.
      skip: the round must not happen (``"skip"``, a replica is unhealthy).
    """

    __slots__ = ("reduce", "mask", "keep", "check", "skip")

    def __init__(
        self, reduce: Reduce, mask: Any = None, keep: Any = None, check: bool = False, skip: bool = False
    ) -> None:
        self.reduce = reduce
        self.mask = mask
        self.keep = keep
        self.check = check
        self.skip = skip


def _rescaled(reduce: Reduce, healthy: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce_healthy(tensor: torch.Tensor) -> torch.Tensor:
        return check_reduced(reduce(tensor), tensor) / healthy.to(tensor.dtype)

    return reduce_healthy


def error(
    policy: str, local: list[str], result: list[str], donated: bool = False, wire: bool = False
) -> NonFiniteError:
    """The [`avgfn.NonFiniteError`][avgfn.NonFiniteError] of a round: whose values, which leaves."""
    if local and wire:
        where = f"this replica holds values that are not finite or too large for the wire dtype at {', '.join(local)}"
    elif local:
        where = f"this replica holds non-finite values at {', '.join(local)}"
    elif result:
        where = (
            f"the group's mean is non-finite at {', '.join(result)}: a peer replica holds "
            "non-finite values there, or they overflowed the wire dtype"
        )
    else:
        where = "a peer replica holds non-finite values" + (
            " (or values too large for the wire dtype)" if wire else ""
        )
    if donated and result and not local:
        tail = "the donated params now hold that mean: restore them from a checkpoint"
    else:
        tail = "nothing was averaged"
    return NonFiniteError(f"{where}; {tail} (nonfinite={policy!r})", paths=tuple(local))


def plan(
    leaves: list[torch.Tensor],
    reduce: Reduce,
    policy: str,
    donate: bool,
    bad_paths: Callable[[], list[str]],
    limit: Optional[float] = None,
    combine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Plan:
    """Decide the round before its data moves (see the module docstring).

    ``combine`` (for shards of DTensors) ands a local verdict over the ranks
    holding the other shards, so that a replica decides as one.
    """
    if policy == "ignore":
        return Plan(reduce)
    if policy in ("raise", "skip") and not donate:
        return Plan(reduce, check=True)
    values = _extremes_of(leaves)
    ok = _judge(values, leaves, limit)
    roomy = _roomy(values, leaves, limit)
    if combine is not None:
        ok, roomy = combine(ok), combine(roomy)
    flags = torch.stack([~ok, ok, ~roomy]).to(torch.float32)
    means = check_reduced(reduce(flags), flags).detach()  # flags: no autograd
    unhealthy, healthy = means[0], means[1]
    if traced(leaves[0]):
        return Plan(_rescaled(reduce, healthy), mask=ok, keep=healthy <= 0, check=True)
    if float(unhealthy) <= 0:
        # Every replica is healthy; on an exact wire with room to spare the sum cannot overflow.
        return Plan(reduce, check=float(means[2]) > 0)
    if policy == "skip":
        return Plan(reduce, skip=True)
    if policy == "raise" or float(healthy) <= 0:
        raise error(policy, [] if bool(ok) else bad_paths(), [], wire=limit is not None)
    return Plan(_rescaled(reduce, healthy), mask=ok, check=True)


_SUMMABLE = (torch.float32, torch.float64, torch.bfloat16)


def _pair_finite(leaves: list[torch.Tensor]) -> Optional[bool]:
    """Whether ``leaves`` are finite, read as a sum (``None``: leaves this test does not take).

    A NaN or an infinity makes the sum non-finite; so may finite values
    whose sum overflows, which are then judged again by their extremes. A
    sum is the cheapest read of a buffer (``aminmax`` costs about half as
    much again on a CPU).
    """
    if not leaves or any(leaf.dtype not in _SUMMABLE for leaf in leaves):
        return None
    span = _one_span(leaves)
    sums = [leaf.detach().sum().reshape(1).to(torch.float64) for leaf in ([span] if span is not None else leaves)]
    if bool(torch.isfinite(torch.cat(sums)).all()):
        return True
    return bool(_judge(_extremes_of(leaves), leaves, None))


def local_health(
    leaves: list[torch.Tensor], limit: Optional[float], combine: Optional[Callable[[torch.Tensor], torch.Tensor]],
    pair: bool = False,
) -> tuple[bool, bool]:
    """``(ok, roomy)`` of this replica's leaves, read on the host: the flags `plan()` exchanges.

    ``pair``: the group has two replicas, each dividing by 2 before the sum,
    on an exact wire. There the sum of the two halves of finite values
    cannot overflow (its exact value is at most the dtype's largest), so
    every finite replica has room, and finiteness alone is read.
    """
    if pair and limit is None and combine is None:
        finite_ = _pair_finite(leaves)
        if finite_ is not None:
            return finite_, finite_
    values = _extremes_of(leaves)
    ok, roomy = _judge(values, leaves, limit), _roomy(values, leaves, limit)
    if combine is not None:
        ok, roomy = combine(ok), combine(roomy)
    return bool(ok), bool(roomy)


def plan_from_flags(
    reduce: Reduce, policy: str, ok: bool, exchanged: Sequence[int], bad_paths: Callable[[], list[str]],
    limit: Optional[float],
) -> Plan:
    """`plan()` for ``"raise"`` / ``"skip"``, from flags the agreement already exchanged.

    ``exchanged`` is ``[any replica not finite, any replica without room]``
    (their MAX over the group): the decisions `plan()` takes from the means
    of its own flags, without that collective.
    """
    unhealthy, crowded = exchanged
    if not unhealthy:
        return Plan(reduce, check=bool(crowded))
    if policy == "skip":
        return Plan(reduce, skip=True)
    raise error(policy, [] if ok else bad_paths(), [], wire=limit is not None)


def check_result(
    policy: str,
    originals: list[torch.Tensor],
    averaged: list[torch.Tensor],
    watch: Optional[Watch],
    bad_paths: Callable[[], list[str]],
    result_paths: Callable[[list[bool]], list[str]],
    donated: bool = False,
    wire: bool = False,
    combine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> list[torch.Tensor]:
    """Refuse a non-finite mean (eager), keep the old values (traced, or ``"skip"``).

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
    healthy = watch.finite()
    if combine is not None:  # every shard of the replica decides alike
        healthy = bool(combine(torch.tensor(healthy)))
    if healthy:
        return averaged
    if policy == "skip" and not donated:
        return originals
    flags = [not bool(finite([value])) for value in averaged]
    raise error(policy, [] if donated else bad_paths(), result_paths(flags), donated, wire)
