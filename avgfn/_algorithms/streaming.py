"""Streaming DiLoCo: DiLoCo in fragments that sync in turn, with overlap and mixing."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._round import sharded as _sharded
from avgfn._round.engine import refusing
from avgfn._round.options import Round
from avgfn._core.types import Averager, Params, Reduce, timeout_of
from avgfn._core.checks import check_int, check_reduce, check_step, check_update
from avgfn._algorithms.outer import (
    at_step,
    check_global_device,
    verify_first_round,
    verify_selected,
    check_match,
    counter,
    held_for,
    outer_apply,
    outer_options,
    plain_mean,
    pseudo_gradient,
    selected,
    snapshot,
    to_local,
    with_settings,
)
from avgfn._core.records import Record, record
from avgfn._core.traced import traced
from avgfn.optim._base import Optimizer

__all__ = ["StreamingDiLoCoState", "streaming_diloco"]

_NOTHING_IN_FLIGHT = torch.tensor([-1, -1], dtype=torch.int64)


@record
class StreamingDiLoCoState(Record):
    """State of [`streaming_diloco()`][avgfn.streaming_diloco].

    Attributes:
      rounds: int64 vector, the outer rounds done for each fragment.
      skipped: int64 count of the fragment rounds skipped for a non-finite
        pseudo-gradient.
      global_params: the global copy of the params, one tensor per selected
        leaf in tree order, in at least float32.
      outer: a tuple with each fragment's outer optimizer state (over that
        fragment's global leaves, in tree order).
      pending: with ``delay > 0``, the averaged pseudo-gradient of the
        fragment in flight, flat, in the global copy's dtype, padded to the
        size of the largest fragment; ``None`` with ``delay == 0``.
      in_flight: with ``delay > 0``, an int64 pair ``[fragment, start step]``
        saying whose average ``pending`` holds, ``[-1, -1]`` once it was
        applied (or before the first start); ``None`` with ``delay == 0``.
    """

    rounds: torch.Tensor
    skipped: torch.Tensor
    global_params: tuple[torch.Tensor, ...]
    outer: tuple[Any, ...]
    pending: Any
    in_flight: Any


def split_fragments(numels: list[int], num_fragments: int) -> list[int]:
    """Assign leaves (in order) to ``num_fragments`` contiguous groups of about equal size.

    Each boundary is the leaf start nearest to ``k * total / num_fragments``
    (the running element count), moved as little as needed so that every
    fragment holds at least one leaf. Returns each leaf's fragment.

    Examples:
      >>> split_fragments([4096, 64, 4096, 64, 640, 10], 2)
      [0, 0, 1, 1, 1, 1]
    """
    count = len(numels)
    total = sum(numels)
    starts = [0]
    running = 0
    cumulative = []
    for n in numels:
        cumulative.append(running)
        running += n
    for k in range(1, num_fragments):
        target = k * total / num_fragments
        # the first leaf whose start is at or past the target, or the one
        # before it when that start is nearer
        b = next((j for j, c in enumerate(cumulative) if c >= target), count)
        if b > 0 and target - cumulative[b - 1] < (cumulative + [total])[b] - target:
            b -= 1
        b = max(b, starts[-1] + 1)
        b = min(b, count - (num_fragments - k))
        starts.append(b)
    starts.append(count)
    out = []
    for k in range(num_fragments):
        out.extend([k] * (starts[k + 1] - starts[k]))
    return out


def streaming_diloco(
    period: int,
    *,
    reduce: Reduce,
    num_fragments: int = 1,
    delay: int = 0,
    alpha: float = 0.0,
    outer_optimizer: Optional[Optimizer] = None,
    fragment_of: Any = None,
    where: _select.Where = None,
    round: Optional[Round] = None,
    global_device: Any = None,
    **deprecated: Any,
) -> Averager:
    """Streaming DiLoCo (Douillard et al., 2025): fragments synced in turn.

    The selected leaves are split into ``num_fragments`` fragments ``F``.
    Each fragment is a small [`avgfn.diloco()`][avgfn.diloco]: every ``period`` steps it
    has an outer round, and the fragments take turns, one every
    ``h = period / F`` steps: fragment ``k`` (from 0) is applied at the steps
    with ``(step + 1) % period == ((k + 1) * h) % period``, so fragment
    ``F - 1`` is applied when plain DiLoCo would be.

    **Overlap** (``delay = tau``): the pseudo-gradient of a fragment is taken
    and averaged ``tau`` steps *before* it is applied, at the steps with
    ``(step + 1 + tau) % h == 0``; the averaged value waits in
    ``state.pending`` while the replicas take ``tau`` more local steps. The
    Reduce is called at the start step and its result is kept as it is: a
    Reduce whose result is a tensor that waits when first read
    (``avgfn.collectives.all_reduce_mean(in_flight=True)``, torch's
    functional collectives) stays in flight in the state until the apply
    step reads it, so the all-reduce runs while the replicas compute (with
    a Reduce that says so, ``in_flight=True``, a fragment smaller than the
    largest goes on the wire padded with zeros, to stay in flight too).

    **Mixing** (``alpha``): when a fragment is applied its local params become
    ``(1 - alpha) * new_global + alpha * local``, the local values being those
    after the ``tau`` extra steps; ``alpha = 0`` restarts them from the new
    global params, as DiLoCo does.

    **Precision**: the global copy and the outer steps are kept in at least
    float32; ``comm_dtype`` (``torch.bfloat16`` or ``torch.float16``) is the
    dtype of the pseudo-gradient on the wire only.

    With ``num_fragments=1``, ``delay=0`` and ``alpha=0`` it is
    [`avgfn.diloco()`][avgfn.diloco], bit for bit.

    Args:
      period: the steps between two outer rounds of a fragment (``H``), ``>= 1``.
      reduce: the mean over the group.
      num_fragments: ``F >= 1``; it must divide ``period``.
      delay: ``tau``, with ``0 <= tau < period / F`` (one fragment in flight
        at a time).
      alpha: the mixing factor, in ``[0, 1]``.
      outer_optimizer: an [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer]; each fragment has
        its own state of it. Default: Nesterov SGD, lr 0.7, momentum 0.9.
      fragment_of: ``None`` to split the selected leaves, in tree order, into
        ``F`` contiguous fragments of about equal element counts; or a pytree
        of ints shaped like params giving each leaf's fragment (its value is
        ignored for unselected leaves; every fragment needs a leaf).
      where: which leaves are synchronized (see [`avgfn.average()`][avgfn.average]).
      round: the [`avgfn.Round`][avgfn.Round] options of each fragment's round, as
        in [`avgfn.diloco()`][avgfn.diloco] (``nonfinite`` ``"raise"``, ``"skip"`` or
        ``"exclude"``, per fragment round; ``verify`` defaults to ``"values"``:
        the global copies are compared before the first fragment's
        pseudo-gradient is averaged, the structure at ``init``).
      global_device: where the global copy and the fragments' outer states
        live, as in [`avgfn.diloco()`][avgfn.diloco] (``None``: the params' device).
        The pseudo-gradients are formed, averaged and held in flight
        (``state.pending``) on the params' device; each fragment's outer step
        and mixing run where the copy is.
      **deprecated: the round options as keywords, their spelling before
        [`avgfn.Round`][avgfn.Round]; they warn.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`StreamingDiLoCoState`][avgfn.StreamingDiLoCoState].

    Raises:
      ValueError: ``period < 1``, ``num_fragments < 1`` or not dividing
        ``period``, ``delay`` outside ``[0, period / num_fragments)``,
        ``alpha`` outside ``[0, 1]``; at ``init``, fewer selected leaves than
        fragments, or a bad ``fragment_of``.
      TypeError: an argument of the wrong type, a ``global_device`` that
        names no device.

    Examples:
      >>> import torch, avgfn
      >>> reduce = avgfn.testing.RecordingReduce()
      >>> avg = avgfn.streaming_diloco(4, reduce=reduce, num_fragments=2, delay=1)
      >>> params = {"a": torch.zeros(3), "b": torch.zeros(3)}
      >>> state = avg.init(params)
      >>> sizes = []
      >>> for step in range(8):
      ...     calls = reduce.calls
      ...     params, state = avg.update(params, state, step)
      ...     sizes.append(reduce.inputs[-1].numel() if reduce.calls > calls else 0)
      >>> sizes        # fragment "a" starts at 0 and 4, "b" at 2 and 6; applied one step later
      [3, 0, 3, 0, 3, 0, 3, 0]
      >>> state.rounds.tolist()
      [2, 2]
    """
    period = check_int("period", period, minimum=1)
    check_reduce("reduce", reduce)
    num_fragments = check_int("num_fragments", num_fragments, minimum=1)
    h, delay, alpha = _check_schedule(period, num_fragments, delay, alpha)
    device = check_global_device(global_device)
    outer, rnd = outer_options("streaming_diloco", outer_optimizer, where, round, deprecated)
    if fragment_of is not None:
        for value in _tree.tree_leaves(fragment_of):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"fragment_of must be a pytree of ints, it holds {value!r}")
    streaming = _Streaming(reduce, num_fragments, h, delay, alpha, outer, rnd, fragment_of, where, device)
    return Averager(init=streaming.init, update=streaming.update)


def _check_schedule(period: int, num_fragments: int, delay: Any, alpha: Any) -> tuple[int, int, float]:
    """Validate the fragment schedule: ``(h, delay, alpha)`` with ``h = period / num_fragments``."""
    if period % num_fragments:
        raise ValueError(
            f"num_fragments must divide period (one fragment every period / num_fragments steps), "
            f"got period={period}, num_fragments={num_fragments}"
        )
    h = period // num_fragments
    delay = check_int("delay", delay, minimum=0)
    if delay >= h:
        raise ValueError(
            f"delay must be < period / num_fragments = {h} (a fragment's average must be applied "
            f"before the next fragment's starts), got delay={delay}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in [0, 1], got {type(alpha).__name__} {alpha!r}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return h, delay, alpha


class _Streaming:
    """The validated options of one [`streaming_diloco()`][avgfn.streaming_diloco] and its two pure functions."""

    def __init__(
        self, reduce: Reduce, num_fragments: int, h: int, delay: int, alpha: float,
        outer: Optimizer, rnd: Round, fragment_of: Any, where: Any, device: Optional[torch.device] = None,
    ) -> None:  # fmt: skip
        self.reduce, self.num_fragments, self.h, self.delay, self.alpha = reduce, num_fragments, h, delay, alpha
        self.outer, self.rnd, self.fragment_of, self.where = outer, rnd, fragment_of, where
        self.device = device

    def mean(self, state: StreamingDiLoCoState, k: int) -> Any:
        """The group mean of fragment ``k``'s pseudo-gradient, named with the group's progress.

        The per-round check compares each fragment's count of outer rounds
        done: a replica that carried on from a step that failed for it alone
        (an apply step with ``delay > 0`` talks to no peer) holds another
        global copy than its peers, and its next round is refused on every
        replica instead of mixing the two.
        """
        who = with_settings(f"streaming_diloco, fragment {k}", self.outer, alpha=self.alpha)
        if not traced(state.rounds):
            who += f", outer rounds done {state.rounds.tolist()}"
        return plain_mean(self.reduce, self.rnd, who)

    def fragments(self, params: Params, leaves: list[Any], spec: Any, chosen: list[int]) -> list[list[int]]:
        """For each fragment, the positions (in ``chosen``) of its leaves."""
        num_fragments = self.num_fragments
        if len(chosen) < num_fragments:
            raise ValueError(
                f"streaming_diloco: num_fragments={num_fragments} but `where` selects only "
                f"{len(chosen)} leaves of params; every fragment needs at least one leaf"
            )
        if self.fragment_of is None:
            owner = split_fragments([leaves[i].numel() for i in chosen], num_fragments)
        else:
            values, f_spec = _tree.tree_flatten(self.fragment_of)
            if f_spec != spec:
                raise ValueError(
                    "fragment_of must be a pytree of ints with the structure of params; "
                    f"fragment_of is {f_spec}, params are {spec}"
                )
            owner = [values[i] for i in chosen]
            for i, k in zip(chosen, owner):
                if not 0 <= k < num_fragments:
                    raise ValueError(
                        f"fragment_of assigns the leaf at {_tree.path_of(params, i)} to fragment {k}, "
                        f"outside [0, {num_fragments})"
                    )
        groups: list[list[int]] = [[] for _ in range(num_fragments)]
        for pos, k in enumerate(owner):
            groups[k].append(pos)
        empty = [k for k, g in enumerate(groups) if not g]
        if empty:
            raise ValueError(f"fragment_of leaves fragment(s) {empty} without any selected leaf")
        return groups

    def init(self, params: Params) -> StreamingDiLoCoState:
        verify_selected(params, self.where, self.reduce, self.rnd.verify, "streaming_diloco")
        leaves, spec, chosen = selected(params, self.where)
        groups = self.fragments(params, leaves, spec, chosen)
        local = [leaves[i] for i in chosen]
        globals_ = snapshot(local, self.device)
        outers = tuple(self.outer.init(tuple(globals_[j] for j in g)) for g in groups)
        pending = in_flight = None
        if self.delay > 0:  # on the params' device, where the pseudo-gradients are averaged
            dtype = globals_[0].dtype
            for g in globals_[1:]:
                dtype = torch.promote_types(dtype, g.dtype)
            size = max(sum(globals_[j].numel() for j in g) for g in groups)
            pending = torch.zeros(size, dtype=dtype, device=local[0].device)
            in_flight = _NOTHING_IN_FLIGHT.to(local[0].device)
        return StreamingDiLoCoState(
            counter(local, (self.num_fragments,)), counter(local), globals_, outers, pending, in_flight
        )

    def due(self, step: int) -> tuple[Optional[int], Optional[int]]:
        """``(apply_k, start_k)``: the fragment applied and the one started at ``step``."""
        h, delay = self.h, self.delay
        apply_k = ((step + 1) // h - 1) % self.num_fragments if (step + 1) % h == 0 else None
        start_k = None
        if delay > 0 and (step + 1 + delay) % h == 0:
            start_k = ((step + 1 + delay) // h - 1) % self.num_fragments
        return apply_k, start_k

    def update(
        self, params: Params, state: StreamingDiLoCoState, step: int
    ) -> tuple[Params, StreamingDiLoCoState]:
        step = check_step(step)
        apply_k, start_k = self.due(step)
        if apply_k is None and start_k is None:
            check_update(params, state, StreamingDiLoCoState, "streaming_diloco")
            return params, state
        talks = start_k is not None or self.delay == 0  # this step averages a pseudo-gradient
        with refusing(self.reduce, self.rnd.agree and talks, step):  # the peers learn of it at once
            check_update(params, state, StreamingDiLoCoState, "streaming_diloco")
            if (
                (self.delay > 0) != (state.pending is not None)
                or (self.delay > 0) != (state.in_flight is not None)
                or len(state.outer) != self.num_fragments
            ):
                raise ValueError(
                    "streaming_diloco: the state was made by a streaming_diloco with other "
                    "num_fragments or delay"
                )
            leaves, spec, chosen = selected(params, self.where, "streaming_diloco(...).update")
            groups = self.fragments(params, leaves, spec, chosen)
            local = [leaves[i] for i in chosen]
            check_match(state.global_params, local, "streaming_diloco")
        if talks:
            with at_step(step):
                verify_first_round(
                    state.rounds, state.global_params, params, self.where, self.reduce, self.rnd.verify,
                    "streaming_diloco",
                )  # fmt: skip
        all_names = _tree.lazy_paths(params, chosen)
        if start_k is not None:
            g = groups[start_k]
            pending = self.start(state, local, start_k, g, params, step, lambda: [all_names()[j] for j in g])
            tag = torch.tensor([start_k, step], dtype=torch.int64, device=state.in_flight.device)
            return params, state.replace(pending=pending, in_flight=tag)
        assert apply_k is not None
        g = groups[apply_k]
        names = lambda: [all_names()[j] for j in g]  # noqa: E731
        valid = None
        if self.delay == 0:
            averaged = self.average(state, local, apply_k, g, params, step, names)
        else:
            averaged = self.unpad(state.pending, [state.global_params[j] for j in g])
            valid = self.in_flight_for(state.in_flight, apply_k, step)
        return self.apply(params, state, leaves, spec, chosen, apply_k, g, averaged, step, names, valid)

    def in_flight_for(self, in_flight: torch.Tensor, k: int, step: int) -> Optional[torch.Tensor]:
        """Whether ``state.pending`` holds fragment ``k``'s average started ``delay`` steps ago.

        Eagerly: ``None`` when it does; a False tensor when nothing is in
        flight (its start step was not run, or its average was applied
        already) or what is held was started before (its own apply step was
        not run: it is stale): the round is then skipped; an average started
        at this start step or later but not the one due is refused. Under a transform the
        answer is a tensor, and a round whose tag does not match is skipped.
        """
        started = step - self.delay
        return held_for(
            in_flight, (k, started),
            lambda held: (
                f"streaming_diloco: at step {step} fragment {k} is due, with its average started at "
                f"step {started} (delay={self.delay}); the state holds fragment {held[0]}'s, started "
                f"at step {held[1]}. Pass the state of the previous step: nothing was applied"
            ),
            older=1,
        )  # fmt: skip

    def average(
        self, state: StreamingDiLoCoState, local: list[Any], k: int, g: list[int], params: Params, step: int,
        names: Any,
    ) -> Any:
        """The group mean of fragment ``g``'s pseudo-gradient."""
        with at_step(step):
            averaged, _ = self.mean(state, k)(
                pseudo_gradient([state.global_params[j] for j in g], [local[j] for j in g]), params, step, names
            )
        return averaged

    def start(
        self, state: StreamingDiLoCoState, local: list[Any], k: int, g: list[int], params: Params, step: int,
        names: Any,
    ) -> torch.Tensor:
        """Start the mean of fragment ``g``'s pseudo-gradient; return the new ``pending``.

        The fragment goes to the round as one flat tensor in ``pending``'s
        dtype, so the Reduce's result is the new ``pending`` itself when the
        fragment is the largest: a result still in flight (a tensor that
        waits when first read) stays in flight in the state until the apply
        step reads it. A smaller fragment is padded to ``pending``'s size:
        after the round (which reads the result at once), or, when the
        Reduce says its results are in flight (a true ``in_flight``
        attribute, as ``all_reduce_mean(in_flight=True)`` has) or under
        ``torch.compile`` (functional collectives), on the wire, with zeros
        that average to zeros. DTensor leaves go as their local shards,
        padded after the round (``pending`` has the full size).
        """
        pending = state.pending
        pseudo = pseudo_gradient([state.global_params[j] for j in g], [local[j] for j in g])
        parts = [_sharded.local(p).reshape(-1).to(pending.dtype) for p in pseudo]
        short = pending.numel() - sum(p.numel() for p in parts)
        held = getattr(self.reduce, "in_flight", False) is True or torch.compiler.is_compiling()
        if short and held and not _sharded.any_dtensor(list(pseudo)):
            parts.append(torch.zeros(short, dtype=pending.dtype, device=pending.device))
        flat = torch.cat(parts)
        label = lambda: ["fragment of " + ", ".join(names())]  # noqa: E731
        with at_step(step):
            (averaged,), _ = self.mean(state, k)((flat,), params, step, label)
        extra = pending.numel() - flat.numel()
        if not extra:
            return averaged
        return torch.cat([averaged, torch.zeros(extra, dtype=pending.dtype, device=pending.device)])

    @staticmethod
    def unpad(pending: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The leaves of a fragment, read back from ``pending``."""
        out, offset = [], 0
        for x in like:
            shard = _sharded.local(x)  # a DTensor's shard is what pad() kept
            piece = pending[offset : offset + shard.numel()].view(shard.shape)
            out.append(_sharded.wrap(piece, x) if _sharded.is_dtensor(x) else piece)
            offset += shard.numel()
        return out

    def apply(
        self, params: Params, state: StreamingDiLoCoState, leaves: list[Any], spec: Any, chosen: list[int],
        k: int, g: list[int], averaged: Any, step: int, names: Any, valid: Optional[torch.Tensor] = None,
    ) -> tuple[Params, StreamingDiLoCoState]:  # fmt: skip
        """Apply fragment ``k``'s outer step and hand its new (mixed) local params back.

        ``valid`` False skips the round (no average of this fragment in flight).
        """
        frag_globals = tuple(state.global_params[j] for j in g)
        new_frag, new_outer, ok = outer_apply(
            frag_globals, state.outer[k], averaged, valid, outer=self.outer, nonfinite=self.rnd.nonfinite,
            who="streaming_diloco", step=step, names=names, local=[leaves[chosen[j]] for j in g],
            timeout=timeout_of(self.reduce),
        )  # fmt: skip
        new_globals = list(state.global_params)
        new_leaves = list(leaves)
        for j, value in zip(g, new_frag):
            new_globals[j] = value
            i = chosen[j]
            if self.alpha:
                mixed = torch.lerp(value, leaves[i].detach().to(device=value.device, dtype=value.dtype), self.alpha)
                value = torch.where(ok, mixed, value)
            new_leaves[i] = to_local(value, leaves[i])
        outers = list(state.outer)
        outers[k] = new_outer
        bump = torch.arange(self.num_fragments, device=state.rounds.device) == k
        new_state = StreamingDiLoCoState(
            state.rounds + bump, state.skipped + (~ok).to(state.skipped.device, state.skipped.dtype),
            tuple(new_globals), tuple(outers), state.pending,
            None if state.in_flight is None else torch.full_like(state.in_flight, -1),  # consumed
        )  # fmt: skip
        return _tree.tree_unflatten(new_leaves, spec), new_state
