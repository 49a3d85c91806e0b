"""Streaming DiLoCo: DiLoCo in fragments that sync in turn, with overlap and mixing."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._round.options import Round
from avgfn._core.types import Averager, Params, Reduce
from avgfn._core.checks import check_int, check_params, check_reduce, check_state, check_step
from avgfn._algorithms.outer import (
    at_step,
    verify_selected,
    check_match,
    counter,
    outer_apply,
    outer_options,
    plain_mean,
    pseudo_gradient,
    selected,
    snapshot,
    to_local,
)
from avgfn._core.records import record
from avgfn.optim._base import Optimizer

__all__ = ["StreamingDiLoCoState", "streaming_diloco"]


@record
class StreamingDiLoCoState:
    """State of :func:`streaming_diloco`.

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
    """

    rounds: torch.Tensor
    skipped: torch.Tensor
    global_params: tuple
    outer: tuple
    pending: Any = None


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
    **deprecated: Any,
) -> Averager:
    """Streaming DiLoCo (Douillard et al., 2025): fragments synced in turn.

    The selected leaves are split into ``num_fragments`` fragments ``F``.
    Each fragment is a small :func:`avgfn.diloco`: every ``period`` steps it
    has an outer round, and the fragments take turns, one every
    ``h = period / F`` steps: fragment ``k`` (from 0) is applied at the steps
    with ``(step + 1) % period == ((k + 1) * h) % period``, so fragment
    ``F - 1`` is applied when plain DiLoCo would be.

    **Overlap** (``delay = tau``): the pseudo-gradient of a fragment is taken
    and averaged ``tau`` steps *before* it is applied, at the steps with
    ``(step + 1 + tau) % h == 0``; the averaged value waits in
    ``state.pending`` while the replicas take ``tau`` more local steps. (The
    Reduce call itself is made at the start step: this pure function cannot
    hold a collective open across calls; run the Reduce asynchronously inside
    it, or overlap by other means, if the wire time matters.)

    **Mixing** (``alpha``): when a fragment is applied its local params become
    ``(1 - alpha) * new_global + alpha * local``, the local values being those
    after the ``tau`` extra steps; ``alpha = 0`` restarts them from the new
    global params, as DiLoCo does.

    **Precision**: the global copy and the outer steps are kept in at least
    float32; ``comm_dtype`` (``torch.bfloat16`` or ``torch.float16``) is the
    dtype of the pseudo-gradient on the wire only.

    With ``num_fragments=1``, ``delay=0`` and ``alpha=0`` it is
    :func:`avgfn.diloco`, bit for bit.

    Args:
      period: the steps between two outer rounds of a fragment (``H``), ``>= 1``.
      reduce: the mean over the group.
      num_fragments: ``F >= 1``; it must divide ``period``.
      delay: ``tau``, with ``0 <= tau < period / F`` (one fragment in flight
        at a time).
      alpha: the mixing factor, in ``[0, 1]``.
      outer_optimizer: an :class:`avgfn.optim.Optimizer`; each fragment has
        its own state of it. Default: Nesterov SGD, lr 0.7, momentum 0.9.
      fragment_of: ``None`` to split the selected leaves, in tree order, into
        ``F`` contiguous fragments of about equal element counts; or a pytree
        of ints shaped like params giving each leaf's fragment (its value is
        ignored for unselected leaves; every fragment needs a leaf).
      where: which leaves are synchronized (see :func:`avgfn.average`).
      round: the :class:`avgfn.Round` options of each fragment's round, as
        in :func:`avgfn.diloco` (``nonfinite`` ``"raise"``, ``"skip"`` or
        ``"exclude"``, per fragment round; ``verify`` defaults to ``"values"``).
      **deprecated: the round options as keywords, their spelling before
        :class:`avgfn.Round`; they warn.

    Returns:
      An :class:`avgfn.Averager` whose state is a :class:`StreamingDiLoCoState`.

    Raises:
      ValueError: ``period < 1``, ``num_fragments < 1`` or not dividing
        ``period``, ``delay`` outside ``[0, period / num_fragments)``,
        ``alpha`` outside ``[0, 1]``; at ``init``, fewer selected leaves than
        fragments, or a bad ``fragment_of``.
      TypeError: an argument of the wrong type.

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
    outer, rnd = outer_options("streaming_diloco", outer_optimizer, where, round, deprecated)
    nonfinite, verify = rnd.nonfinite, rnd.verify
    if fragment_of is not None:
        for value in _tree.tree_leaves(fragment_of):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"fragment_of must be a pytree of ints, it holds {value!r}")
    mean = plain_mean(reduce, rnd)

    def fragments(params: Params, leaves: list[Any], spec: Any, chosen: list[int]) -> list[list[int]]:
        """For each fragment, the positions (in ``chosen``) of its leaves."""
        if len(chosen) < num_fragments:
            raise ValueError(
                f"streaming_diloco: num_fragments={num_fragments} but `where` selects only "
                f"{len(chosen)} leaves of params; every fragment needs at least one leaf"
            )
        if fragment_of is None:
            owner = split_fragments([leaves[i].numel() for i in chosen], num_fragments)
        else:
            values, f_spec = _tree.tree_flatten(fragment_of)
            if f_spec != spec:
                raise ValueError(
                    "fragment_of must be a pytree of ints with the structure of params; "
                    f"fragment_of is {f_spec}, params are {spec}"
                )
            owner = [values[i] for i in chosen]
            for i, k in zip(chosen, owner):
                if not 0 <= k < num_fragments:
                    path = _tree.path_of(params, i)
                    raise ValueError(
                        f"fragment_of assigns the leaf at {path} to fragment {k}, outside "
                        f"[0, {num_fragments})"
                    )
        groups: list[list[int]] = [[] for _ in range(num_fragments)]
        for pos, k in enumerate(owner):
            groups[k].append(pos)
        empty = [k for k, g in enumerate(groups) if not g]
        if empty:
            raise ValueError(f"fragment_of leaves fragment(s) {empty} without any selected leaf")
        return groups

    def init(params: Params) -> StreamingDiLoCoState:
        verify_selected(params, where, reduce, verify)
        leaves, spec, chosen = selected(params, where)
        groups = fragments(params, leaves, spec, chosen)
        local = [leaves[i] for i in chosen]
        globals_ = snapshot(local)
        outers = tuple(outer.init(tuple(globals_[j] for j in g)) for g in groups)
        pending = None
        if delay > 0:
            dtype = globals_[0].dtype
            for g in globals_[1:]:
                dtype = torch.promote_types(dtype, g.dtype)
            size = max(sum(globals_[j].numel() for j in g) for g in groups)
            pending = torch.zeros(size, dtype=dtype, device=globals_[0].device)
        return StreamingDiLoCoState(
            counter(local, (num_fragments,)), counter(local), globals_, outers, pending
        )

    def update(
        params: Params, state: StreamingDiLoCoState, step: int
    ) -> tuple[Params, StreamingDiLoCoState]:
        check_state(state, StreamingDiLoCoState, "streaming_diloco")
        check_params(params, "streaming_diloco(...).update")
        step = check_step(step)
        apply_k = ((step + 1) // h - 1) % num_fragments if (step + 1) % h == 0 else None
        start_k = None
        if delay > 0 and (step + 1 + delay) % h == 0:
            start_k = ((step + 1 + delay) // h - 1) % num_fragments
        if apply_k is None and start_k is None:
            return params, state
        if (delay > 0) != (state.pending is not None) or len(state.outer) != num_fragments:
            raise ValueError(
                "streaming_diloco: the state was made by a streaming_diloco with other "
                "num_fragments or delay"
            )
        leaves, spec, chosen = selected(params, where)
        groups = fragments(params, leaves, spec, chosen)
        local = [leaves[i] for i in chosen]
        globals_ = state.global_params
        check_match(globals_, local, "streaming_diloco")

        all_names = _tree.lazy_paths(params, chosen)

        def names_of(g: list[int]) -> Any:
            return lambda: [all_names()[j] for j in g]

        if start_k is not None:
            # Take the fragment's pseudo-gradient now; it is applied `delay` steps later.
            g = groups[start_k]
            with at_step(step):
                averaged, _ = mean(
                    pseudo_gradient([globals_[j] for j in g], [local[j] for j in g]), params, step,
                    names_of(g),
                )
            flat = torch.cat([a.reshape(-1).to(state.pending.dtype) for a in averaged])
            pad = state.pending.numel() - flat.numel()
            if pad:
                flat = torch.cat([flat, flat.new_zeros(pad)])
            return params, state.replace(pending=flat)

        assert apply_k is not None
        g = groups[apply_k]
        frag_globals = tuple(globals_[j] for j in g)
        if delay == 0:
            with at_step(step):
                averaged, _ = mean(
                    pseudo_gradient(frag_globals, [local[j] for j in g]), params, step, names_of(g)
                )
        else:
            averaged, offset = [], 0
            for x in frag_globals:
                n = x.numel()
                averaged.append(state.pending[offset : offset + n].view(x.shape))
                offset += n
        new_frag, new_outer, ok = outer_apply(
            frag_globals, state.outer[apply_k], averaged, None,
            outer=outer, nonfinite=nonfinite, who="streaming_diloco", step=step,
            names=names_of(g), local=[local[j] for j in g],
        )  # fmt: skip
        new_globals = list(globals_)
        new_leaves = list(leaves)
        for j, value in zip(g, new_frag):
            new_globals[j] = value
            i = chosen[j]
            if alpha:
                mixed = torch.lerp(value, leaves[i].detach().to(value.dtype), alpha)
                value = torch.where(ok, mixed, value)
            new_leaves[i] = to_local(value, leaves[i])
        outers = list(state.outer)
        outers[apply_k] = new_outer
        bump = torch.arange(num_fragments, device=state.rounds.device) == apply_k
        new_state = StreamingDiLoCoState(
            state.rounds + bump,
            state.skipped + (~ok).to(state.skipped.dtype),
            tuple(new_globals),
            tuple(outers),
            state.pending,
        )
        return _tree.tree_unflatten(new_leaves, spec), new_state

    return Averager(init=init, update=update)
