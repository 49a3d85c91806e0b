"""One averaging round, for every averager: agree, check health, pack, reduce, unpack.

`reduce_round()` is the round every averager runs (on its params, or on
the pseudo-gradients of an outer step). In order:

1. the replicas agree on what they average and at which step
   (`avgfn._round.agree`), before any value is mixed;
2. the non-finite policy decides the round (`avgfn._round.health`);
3. the values go through buffers (`avgfn._round.buffers`): one Reduce
   call per device and bucket;
4. the results are checked, and the group is asked to commit the round.

On any failure the caller's tensors are unchanged, except those it donated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Literal, Optional

import attrs
import torch

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._core import types as _types
from avgfn._core.checks import check_has_tensor
from avgfn._core.errors import AveragingError, PeerError, ReplicaMismatchError, RoundNotCommitted
from avgfn._core.traced import batched, traced
from avgfn._core.types import Params, Reduce
from avgfn._round import agree as _agree
from avgfn._round import facts as _facts
from avgfn._round import health as _health
from avgfn._round import predicted as _predicted
from avgfn._round import sharded as _sharded
from avgfn._round.buffers import Buffers, check_donatable
from avgfn._round.options import DEFAULT, Round

Names = Callable[[], list[str]]
"""Lazily names the leaves of a round (their params paths), for errors and agreement."""


def _check_leaves(leaves: list[torch.Tensor], rnd: Round, names: Names) -> None:
    if not rnd.plain_wire and batched(leaves[0]):
        raise ValueError(
            "Round(donate, bucket_bytes, comm_dtype) is not supported under torch.func.vmap (they "
            f"stage values in plain buffers); got {rnd}. Use the default round there."
        )
    if rnd.comm_dtype is not None:
        for k, leaf in enumerate(leaves):
            if leaf.is_complex():
                raise TypeError(
                    f"Round(comm_dtype={rnd.comm_dtype}) cannot carry the complex leaf at "
                    f"{names()[k]} (its imaginary part would be lost); leave comm_dtype=None "
                    "or exclude the leaf with where="
                )


def _by_device(
    leaves: list[torch.Tensor], reduce: Reduce, rnd: Round, residuals: Any, watch: Any, gate: Any,
    facts: _facts.Facts,
) -> tuple[list[torch.Tensor], Any, bool]:  # fmt: skip
    """Average per device; also say whether any buffer wrote into the donated leaves.

    ``gate`` is the agreement check on the wire: waited for after the first
    buffer is packed, before any data collective starts.
    """
    dtype = facts.dtype
    if facts.device is not None:  # one device: one set of buffers, no regrouping
        buffers = Buffers(leaves, reduce, rnd, dtype, residuals, watch, facts)
        values, res = buffers.run(gate)
        if residuals is not None and res is None:
            res = [None] * len(leaves)
        return values, res, buffers.donate
    groups: dict[torch.device, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(leaf.device, []).append(i)
    out: list[Any] = [None] * len(leaves)
    new_res: Any = None if residuals is None else [None] * len(leaves)
    wrote = False
    for indices in groups.values():
        part = None if residuals is None else [residuals[i] for i in indices]
        buffers = Buffers([leaves[i] for i in indices], reduce, rnd, dtype, part, watch)
        values, res = buffers.run(gate)
        gate = _types.AGREED
        wrote = wrote or buffers.donate
        for j, i in enumerate(indices):
            out[i] = values[j]
            if new_res is not None:
                new_res[i] = None if res is None else res[j]
    return out, new_res, wrote


def _move(
    sent: list[torch.Tensor], group: Reduce, reduce: Reduce, rnd: Round, residuals: Any, watch: Any, gate: Any,
    facts: _facts.Facts,
) -> tuple[list[torch.Tensor], Any, bool, Any]:  # fmt: skip
    """Move the round's data; also say whether it wrote into donated leaves, and the watch used.

    A round whose check travels with its data (``gate`` is a
    `avgfn._round.predicted.Predicted`) that does not pass it runs with its
    agreement first: the agreement of ``group``, then the data.
    """
    if isinstance(gate, _predicted.Predicted):
        done = Buffers(sent, reduce, rnd, facts.dtype, None, watch, facts).run_predicted(gate)
        if done is not None:
            return done, residuals, False, watch
        _passed(gate.fallback(group), None)  # some replica disagrees, or did not expect this round
        gate, watch = _types.AGREED, (None if watch is None else _health.Watch())
    averaged, new_res, wrote = _by_device(sent, reduce, rnd, residuals, watch, gate, facts)
    return averaged, new_res, wrote, watch


def _passed(gate: _types.Agreement, refusal: Optional[Exception]) -> None:
    """Wait for the agreement; then raise this replica's own refusal, if it has one."""
    try:
        gate.wait()
    except ReplicaMismatchError:
        if refusal is None:
            raise
    if refusal is not None:
        raise refusal


def _donated_failure(error: PeerError) -> PeerError:
    message = str(error.args[0]).replace(" The params and state passed to update are unchanged.", "")
    return PeerError(
        f"{message} The round donated its params (Round(donate=True)): they may hold a mix of "
        "divided and averaged values; do not use them, restore params and state from a "
        "checkpoint (donate=False would have left them unchanged).",
        group=error.group,
        timeout=error.timeout,
    )


def _zero_unless(ok: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``leaf`` where ``ok``, zeros where not (a NaN times zero is still NaN)."""
    return torch.where(ok, leaf.detach(), torch.zeros((), dtype=leaf.dtype, device=leaf.device))


def _like(leaf: torch.Tensor, value: torch.Tensor, keep: Any) -> torch.Tensor:
    """Give an excluded round's result the leaf's autograd flag; keep the leaf if told."""
    if keep is not None:
        value = torch.where(keep, leaf.detach(), value)
    if leaf.requires_grad and not value.requires_grad:
        value = value.requires_grad_(True)
    return value


def _wire_limit(rnd: Round) -> Optional[float]:
    """The largest magnitude a leaf may hold on the wire dtype.

    Some paths cast a value to the wire dtype before they divide it by the
    group size (error feedback, excluding), so the bound is the dtype's own.
    """
    if rnd.comm_dtype is None or not rnd.comm_dtype.is_floating_point:
        return None
    return torch.finfo(rnd.comm_dtype).max


def reduce_round(
    leaves: list[torch.Tensor],
    reduce: Reduce,
    rnd: Round,
    *,
    step: Optional[int],
    names: Names,
    key: Any = None,
    residuals: Optional[list[Optional[torch.Tensor]]] = None,
    policy: Optional[str] = None,
    refusal: Optional[Exception] = None,
    what: str = "params",
) -> tuple[list[torch.Tensor], Optional[list[Optional[torch.Tensor]]]]:
    """Average ``leaves`` over the group of ``reduce`` as ``rnd`` says (see the module docstring).

    DTensor leaves (FSDP2's params) are averaged as their local shards and
    come back as DTensors laid out as they were (`avgfn._round.sharded`).

    ``names()`` names the leaves, ``key`` (hashable) identifies their
    structure for the agreement's cache, ``residuals`` are the error-feedback
    residuals (one per leaf, or ``None``), ``policy`` overrides
    ``rnd.nonfinite``, ``refusal`` is the error of a local check the caller
    made: it is raised once the peers know (they raise at once instead of
    waiting for this replica), ``what`` names what the leaves are
    (``"params"``, ``"pseudo-gradients"``, ``"gradients"``): replicas that
    average different things disagree. Returns the averaged leaves (the
    leaves themselves when nothing was averaged) and the new residuals.
    """
    if _sharded.any_dtensor(leaves) or (residuals is not None and _sharded.any_dtensor(residuals)):
        shards, origins = _sharded.unwrap(leaves)
        res = None if residuals is None else [None if r is None else _sharded.local(r) for r in residuals]
        averaged, new_res = _reduce_local(
            shards, reduce, rnd, step=step, names=names, key=key, residuals=res, policy=policy,
            refusal=refusal, sharding=_sharded.layouts(leaves),
            combine=lambda flag: _sharded.everywhere(flag, leaves, step, _types.timeout_of(reduce)), what=what,
        )  # fmt: skip
        if averaged is shards:  # nothing was averaged
            return leaves, residuals
        out = _sharded.rewrap(averaged, origins, shards)
        if new_res is not None and residuals is not None and res is not None:
            new_res = [
                None if r is None else _sharded.wrap(r, old if _sharded.is_dtensor(old) else None, shard)
                for r, old, shard in zip(new_res, residuals, res)
            ]
        return out, new_res
    return _reduce_local(
        leaves, reduce, rnd, step=step, names=names, key=key, residuals=residuals, policy=policy,
        refusal=refusal, what=what,
    )  # fmt: skip


def refuse(reduce: Reduce, step: Optional[int], error: Exception) -> None:
    """Tell the peers, in the round's agreement, that this replica refuses the round for ``error``.

    For a failure of this replica's own inputs found before its round
    started, at a step whose round its peers run: they raise
    [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] naming it at
    once (its ``refused_by`` holds this rank) instead of waiting for a
    collective that never comes, and the group stays in step. The caller
    raises ``error`` itself; a failure of the agreement (a peer gone too) is
    not raised over it. Under a ``torch.func`` transform nothing is sent:
    the peers' rounds run no check there (see `avgfn._round.agree.start_round`).
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return
    try:
        reduce_round([], reduce, DEFAULT, step=step, names=list, refusal=error)
    except Exception:  # noqa: BLE001 - ``error`` is what the caller raises
        pass


class refusing:
    """The checks of a due step that only this replica's inputs decide: their failure is forwarded.

    An exception raised inside (a ``TypeError`` or ``ValueError`` of a check:
    a state of another averager, params that are a generator, a ``where``
    that selects a non-tensor, a global copy that no longer fits; or any
    error of the user's own callables run there: ``where``, a weight, an
    ``lr`` schedule) goes to `refuse()` before it propagates, when ``agree``
    (the round's agreement is on: without it the peers run no check to
    meet). No collective runs inside. Errors of a round itself
    ([`avgfn.AveragingError`][avgfn.AveragingError]) pass as they are.

    Examples:
      >>> import torch
      >>> with refusing(lambda t: t, True, 3):
      ...     pass
    """

    __slots__ = ("reduce", "agree", "step")

    def __init__(self, reduce: Reduce, agree: bool, step: Optional[int]) -> None:
        self.reduce, self.agree, self.step = reduce, agree, step

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> Literal[False]:
        if self.agree and isinstance(error, Exception) and not isinstance(error, AveragingError):
            refuse(self.reduce, self.step, error)
            try:
                setattr(error, "avgfn_refused_round", True)  # the peers were told (see `avgfn.chain`)
            except AttributeError:  # an exception class without a __dict__
                pass
        return False


def _reduce_local(
    leaves: list[torch.Tensor],
    reduce: Reduce,
    rnd: Round,
    *,
    step: Optional[int],
    names: Names,
    key: Any,
    residuals: Optional[list[Optional[torch.Tensor]]],
    policy: Optional[str],
    refusal: Optional[Exception],
    sharding: Optional[tuple[str, ...]] = None,
    combine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    what: str = "params",
) -> tuple[list[torch.Tensor], Optional[list[Optional[torch.Tensor]]]]:
    """`reduce_round()` on plain tensors.

    ``sharding``: the DTensor layouts they are shards of; ``combine``: ands
    a health verdict over the ranks holding the other shards.
    """
    policy = rnd.nonfinite if policy is None else policy
    if rnd.donate:  # a leaf still in flight (a mean not read yet) is written once it is there
        leaves = _types.settle_all(leaves)
    if refusal is None and leaves:
        try:
            _check_leaves(leaves, rnd, names)
        except (TypeError, ValueError) as error:
            refusal = error
    facts = _facts.facts(leaves) if leaves else None
    if rnd.donate and facts is not None and _pure_is_one_collective(rnd, reduce, facts, policy, sharding):
        rnd = _undonated(rnd)
    exchange = policy != "ignore" and (rnd.donate or policy == "exclude")  # the health flag
    limit = _wire_limit(rnd)
    gate, carried = _agreement(
        leaves, reduce, rnd, policy, exchange, refusal, limit, step, names, key, sharding, combine, facts, what
    )
    if facts is None:
        return leaves, residuals

    def local_bad() -> list[str]:
        return [names()[k] for k, leaf in enumerate(leaves) if not bool(_health.finite([leaf], limit))]

    if carried is not None:
        plan = _health.plan_from_flags(reduce, policy, carried[0], carried[1], local_bad, limit)
    else:
        plan = _health.plan(leaves, reduce, policy, rnd.donate, local_bad, limit, combine)
    if plan.skip:
        return leaves, residuals
    sent, sent_res = _sent(plan, leaves, residuals)
    watch = _health.Watch() if plan.check and not traced(leaves[0]) else None
    # a donated round whose sum may overflow is checked before anything is written
    staged = rnd.donate and plan.check and plan.mask is None and watch is not None and not _bounded(plan.reduce)
    moved = _undonated(rnd) if staged else rnd
    try:
        averaged, new_res, wrote, watch = _move(sent, reduce, plan.reduce, moved, sent_res, watch, gate, facts)
    except PeerError as error:
        raise (_donated_failure(error) if moved.donate else error) from error
    if plan.mask is not None:
        averaged, new_res = _unmasked(plan, leaves, residuals, averaged, new_res)
    if plan.check:
        averaged = _health.check_result(
            policy, leaves, averaged, watch, local_bad,
            lambda flags: [names()[k] for k, bad in enumerate(flags) if bad], wrote, limit is not None,
            combine,
        )  # fmt: skip
        if averaged is leaves:  # skipped: nothing was averaged
            return leaves, residuals
    if not _types.commit(reduce):
        raise RoundNotCommitted(
            "the group did not commit this averaging round; the inputs of update are unchanged"
            + (" except the donated params" if moved.donate else "")
        )
    if staged:
        averaged = _written_back(leaves, averaged)
    return averaged, new_res


def _sent(plan: _health.Plan, leaves: list[torch.Tensor], residuals: Any) -> tuple[list[torch.Tensor], Any]:
    """What this replica sends: its leaves and residuals, or zeros where it is excluded."""
    if plan.mask is None:
        return leaves, residuals
    # an excluded replica sends nothing, its carried rounding error included
    sent = [_zero_unless(plan.mask, leaf) for leaf in leaves]
    if residuals is not None:
        residuals = [None if r is None else _zero_unless(plan.mask, r) for r in residuals]
    return sent, residuals


def _unmasked(
    plan: _health.Plan, leaves: list[torch.Tensor], residuals: Any, averaged: list[torch.Tensor], new_res: Any
) -> tuple[list[torch.Tensor], Any]:
    """An excluding round's results: the mean (or the old values), and each replica's residual."""
    averaged = [_like(leaf, value, plan.keep) for leaf, value in zip(leaves, averaged)]
    if new_res is not None and residuals is not None:  # and keeps the error it carried
        new_res = [
            n if n is None or old is None else torch.where(plan.mask, n, old) for n, old in zip(new_res, residuals)
        ]
    return averaged, new_res


def _bounded(reduce: Reduce) -> bool:
    """Whether a sum of shares of values within the wire's range stays within it.

    A group-backed Reduce whose divisor is a power of two: each share is the
    value's exact quotient, or on a narrower wire its rounding, which is at
    most the quotient of the wire's largest value (itself representable),
    so the sum of the shares is at most that largest value. With another
    divisor a share may round up (65504 / 3 in float16 rounds to 21840, and
    three of them sum to infinity); with a Reduce of unknown arithmetic
    nothing is known.
    """
    group = _types.group_of(reduce)
    if group is None:
        return False
    by = group.divisor()
    return by >= 1 and by & (by - 1) == 0


def _written_back(leaves: list[torch.Tensor], averaged: list[torch.Tensor]) -> list[torch.Tensor]:
    """The checked mean written into the donated ``leaves``, returned in a new list.

    A new list, as a donated round returns: the callers tell a round that
    averaged from one that was skipped by whether they get their own list back.
    """
    with torch.no_grad():
        for leaf, value in zip(leaves, averaged):
            if value is not leaf:
                leaf.copy_(value)
    return list(leaves)


def _pure_is_one_collective(
    rnd: Round, reduce: Reduce, facts: _facts.Facts, policy: str, sharding: Optional[tuple[str, ...]]
) -> bool:
    """Whether a donated round is cheaper run as the pure round: one collective, its check in its data.

    In a group of two, a plain round of at most `avgfn._round.predicted.LIMIT`
    elements carries its agreement in its data collective. A donated round
    cannot (its collective writes into the donated leaves, which a failed
    check must leave as they were), so it runs the check first and its data
    after; on such a round the second collective's latency costs more than
    the copy into a fresh buffer that donation saves. Every replica decides
    alike: the decision depends only on options the replicas agree on and on
    the round's layout, which the check compares.
    """
    if not rnd.agree or rnd.bucket_bytes is not None or rnd.comm_dtype is not None:  # (error feedback needs a comm_dtype)
        return False
    if policy == "exclude" or sharding is not None:  # their health exchange comes first anyway
        return False
    return _predicted.history(reduce) is not None and _predicted.layout(facts, reduce) is not None


_UNDONATED: dict[Round, Round] = {}


def _undonated(rnd: Round) -> Round:
    """``rnd`` without donation (kept: building a `Round` validates every option)."""
    found = _UNDONATED.get(rnd)
    if found is None:
        if len(_UNDONATED) >= 16:
            _UNDONATED.clear()
        found = _UNDONATED[rnd] = attrs.evolve(rnd, donate=False)
    return found


def _agreement(
    leaves: list[torch.Tensor], reduce: Reduce, rnd: Round, policy: str, exchange: bool,
    refusal: Optional[Exception], limit: Optional[float], step: Optional[int], names: Names, key: Any,
    sharding: Optional[tuple[str, ...]], combine: Optional[Callable[[torch.Tensor], torch.Tensor]],
    facts: Optional[_facts.Facts], what: str = "params",
) -> tuple[Any, Optional[tuple[bool, list[int]]]]:  # fmt: skip
    """Start the round's agreement; wait for it when nothing may move before it passed.

    Returns the gate to wait on before the data moves (`AGREED` once waited)
    and, when the round's health flags ("any replica not finite", "any
    without room on the wire") travelled with the agreement (a donated
    ``"raise"`` / ``"skip"`` round on a group that carries them: one
    collective fewer), ``(this replica finite, their MAX over the group)``.
    """
    if not rnd.agree:
        if refusal is not None:
            raise refusal
        return _types.AGREED, None
    local = None
    group = _types.group_of(reduce)
    in_check = exchange and policy in ("raise", "skip")  # health flags that may travel with the check
    if in_check and refusal is None and leaves and not traced(leaves[0]):
        if _types.carries_flags(reduce):
            pair = group is not None and group.size == 2 and group.divisor() == 2
            local = _health.local_health(leaves, limit, combine, pair)
    # also with no leaf: the peers must learn that this replica averages nothing
    devices = 0 if facts is None else 1 if facts.device is not None else len({leaf.device for leaf in leaves})
    # everything that decides which collectives the round runs (one, or the check first)
    held = getattr(group, "in_flight", False) is True
    # and what the group's Reduce can do that changes them (a wrapper may hide it on one replica)
    able = ""
    if group is not None and group.size == 2:  # a pair may carry its check in its data
        able += f", predicts={_predicted.history(reduce) is not None}"
    if in_check:  # the flags travel with the check, or in a collective of their own
        able += f", flags in check={_types.carries_flags(reduce)}"
    able += _agree.lanes_entry(reduce)  # a large round is split over them, the same piece on the same group everywhere
    # and the options that decide what a round returns: a replica that ignores a NaN its peer
    # refuses would return a mean the peer raises over
    judged = rnd.nonfinite if policy == rnd.nonfinite else f"{rnd.nonfinite} (this round {policy})"
    wire = (
        f"averages={what}, comm_dtype={rnd.comm_dtype}, bucket_bytes={rnd.bucket_bytes}, health flag={exchange}, "
        f"devices={devices}, donate={rnd.donate}, in flight={held}{able}, nonfinite={judged}, "
        f"error_feedback={rnd.error_feedback}"
    )
    refused = "" if refusal is None else f"{type(refusal).__name__}: {refusal}"
    flags = None if local is None else [int(not local[0]), int(not local[1])]
    layout = None
    if facts is not None and refusal is None and sharding is None and rnd.comm_dtype is None:
        if not (exchange or rnd.donate or rnd.bucket_bytes is not None):  # one plain collective
            layout = _predicted.layout(facts, reduce)
    signature = None if facts is None else facts.signature
    gate = _agree.start_round(leaves, reduce, step, names, key, wire, refused, sharding, flags, layout, signature)
    if isinstance(gate, _predicted.Predicted):  # its check travels with its data
        return gate, None
    if not (refusal is not None or not leaves or exchange or rnd.donate):
        return gate, None
    _passed(gate, refusal)  # nothing may move, nor a donated leaf be written, before the check passed
    exchanged = None if local is None else getattr(gate, "flags", None)
    if local is None or exchanged is None:
        return _types.AGREED, None
    return _types.AGREED, (local[0], exchanged)


def _residual_leaves(residual: Any, leaves: list[Any]) -> list[Any]:
    """Align the residual (one tensor per floating-point leaf) with ``leaves``."""
    if not isinstance(residual, tuple):
        raise ValueError(
            "the state has no error-feedback residual, but the averager runs with "
            "Round(error_feedback=True): was the state made by this averager's init?"
        )
    it = iter(residual)
    out: list[Any] = []
    for leaf in leaves:
        if _select.default_selected(leaf):
            res = next(it, None)
            if res is None or res.shape != leaf.shape:
                raise ValueError(
                    "the error-feedback residual in the state does not match params "
                    "(was the state made by init for these params?)"
                )
            out.append(res)
        else:
            out.append(None)
    if next(it, None) is not None:
        raise ValueError("the error-feedback residual in the state has more tensors than params")
    return out


def average_tree(
    params: Params,
    reduce: Reduce,
    where: _select.Where,
    rnd: Round = DEFAULT,
    residual: Any = None,
    step: Optional[int] = None,
    what: str = "params",
    who: Optional[str] = None,
) -> tuple[Params, Any]:
    """Average the leaves of ``params`` that ``where`` selects; also return the new residual.

    ``residual`` (with ``rnd.error_feedback``) is a tuple of one tensor per
    floating-point leaf of ``params``, in tree order; ``what`` as in
    `reduce_round()`. With ``who`` (an update's name), a tree without any
    tensor is refused with ``TypeError``, and the peers learn of it.
    """
    with refusing(reduce, rnd.agree, step):
        leaves, flat = _tree.flatten(params)
        if who is not None:
            check_has_tensor(leaves, who)
        mask = _select.selection(where, params, leaves, flat)
    chosen = list(itertools.compress(range(len(mask)), mask))
    if not chosen:
        reduce_round([], reduce, rnd, step=step, names=lambda: [], key=(flat.key, ()), what=what)
        return params, residual
    names = _tree.lazy_paths(params, chosen)
    every = len(chosen) == len(leaves)
    selected = leaves if every else [leaves[i] for i in chosen]
    res_leaves = refusal = None
    try:  # checks of what this replica alone holds: its peers learn of a failure
        _check_leaves(selected, rnd, names)
        if rnd.donate:
            local = [_sharded.local(t) for t in leaves] if _sharded.any_dtensor(leaves) else leaves
            check_donatable(local, mask, lambda i: _tree.path_of(params, i))
        if rnd.error_feedback:
            res_leaves = _residual_leaves(residual, leaves)
    except (TypeError, ValueError) as error:
        refusal = error
    averaged, new_res = reduce_round(
        selected, reduce, rnd, step=step, names=names, key=(flat.key, tuple(chosen)),
        residuals=None if res_leaves is None else [res_leaves[i] for i in chosen], refusal=refusal, what=what,
    )  # fmt: skip
    if averaged is selected:  # the round was skipped
        return params, residual
    if every:
        new_leaves = averaged
    else:
        new_leaves = list(leaves)
        for i, value in zip(chosen, averaged):
            new_leaves[i] = value
    new_residual = residual
    if new_res is not None and res_leaves is not None:
        for i, res in zip(chosen, new_res):
            if res is not None:
                res_leaves[i] = res
        new_residual = tuple(r for r in res_leaves if r is not None)
    return flat.unflatten(new_leaves), new_residual


class Averaging:
    """What an averager does at a due step: its ``where`` and its [`Round`][avgfn.Round].

    Shared by the averagers that average params directly (periodic,
    hierarchical). ``who`` names the averager in the per-round check, so
    that replicas built with averagers of another kind refuse their rounds.
    """

    __slots__ = ("where", "round", "what", "who")

    def __init__(self, where: _select.Where, rnd: Round, who: str) -> None:
        _select.check_where(where)
        self.where = where
        self.round = rnd
        self.what = f"params of {who}"
        self.who = f"{who}(...).update"

    def init_residual(self, params: Params) -> Any:
        """The error-feedback residual to keep in the state (``None`` without it)."""
        if not self.round.error_feedback:
            return None
        return tuple(
            torch.zeros_like(leaf, dtype=torch.promote_types(leaf.dtype, torch.float32))
            for leaf in _tree.tree_leaves(params)
            if _select.default_selected(leaf)
        )

    def __call__(self, params: Params, reduce: Reduce, residual: Any, step: int) -> tuple[Params, Any]:
        """Average ``params`` with ``reduce``; errors of the round name ``step``."""
        try:
            return average_tree(params, reduce, self.where, self.round, residual, step, self.what, self.who)
        except AveragingError as error:
            raise error.at_step(step) from error
