"""The outer step that DiLoCo, Streaming DiLoCo, SlowMo and FedAvgM share.

Each keeps a global copy of the params in its state; at a round it forms
the pseudo-gradient ``global - local``, averages it over the group (through
the round engine), applies an outer optimizer to the global copy, and hands
fresh local params back. The non-finite policies of an outer step are
``"raise"``, ``"skip"`` and ``"exclude"``, decided on values every replica
shares, so all replicas raise or skip together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

import torch

from avgfn._core.traced import traced, zeros_like_batch
from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._round.engine import Names, reduce_round, refusing
from avgfn._round import sharded as _sharded
from avgfn._round.options import Round, round_options
from avgfn._core.types import Averager, Params, Reduce
from avgfn._core.checks import check_has_tensor, check_params, check_step, check_update
from avgfn._core import types as _types
from avgfn._core.errors import AveragingError, NonFiniteError, ReplicaMismatchError
from avgfn._core.records import Record, record
from avgfn._round.agree import verify as verify_replicas
from avgfn._round.health import finite as _finite
from avgfn.optim._base import Optimizer
from avgfn.optim._sgd import sgd

OUTER_NONFINITE = ("raise", "skip", "exclude")
"""The non-finite policies an outer step accepts (``"ignore"`` would corrupt the global copy)."""

Tensors = tuple[torch.Tensor, ...]
Mean = Callable[[Tensors, Params, int, Names], tuple[Tensors, Optional[torch.Tensor]]]
"""``mean(tensors, params, step, names) -> (means, ok)``: the group mean of a
tuple of tensors (``names()`` names them), and an optional 0-d bool tensor
that is False when the round is invalid (for example, all weights zero)."""


def check_outer_optimizer(name: str, value: Any) -> Optimizer:
    """Validate an outer optimizer argument (an [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer])."""
    if not isinstance(value, Optimizer):
        raise TypeError(
            f"{name} must be an avgfn.optim.Optimizer (e.g. avgfn.optim.sgd(0.7, momentum=0.9, "
            f"nesterov=True)), got {type(value).__name__} {value!r}"
        )
    return value


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the global copy of a leaf: at least float32 (fp32 accumulation)."""
    return torch.promote_types(dtype, torch.float32)


def selected(params: Params, where: _select.Where, who: Optional[str] = None) -> tuple[list[Any], Any, list[int]]:
    """``(leaves, spec, chosen)``: the flattened params and the indices ``where`` selects.

    With ``who`` (an update's name), a tree without any tensor is refused
    with ``TypeError`` (`avgfn._core.checks.check_has_tensor`).
    """
    leaves, spec = _tree.tree_flatten(params)
    if who is not None:
        check_has_tensor(leaves, who)
    mask = _select.selection(where, params, leaves, spec)
    return leaves, spec, [i for i, chosen in enumerate(mask) if chosen]


def verify_selected(
    params: Params, where: _select.Where, reduce: Reduce, mode: Optional[str], who: str = "outer step"
) -> None:
    """The check at ``init`` of an outer-step averager: the structure of the selected leaves.

    With ``mode`` ``"structure"`` or ``"values"`` the replicas compare the
    paths, shapes and dtypes of the leaves ``where`` selects; with ``None``
    nothing. The values are not compared here: ``init`` cannot tell a fresh
    start (its params become the global copy, which must be equal everywhere)
    from a resume (``avgfn.load_state_dict(avg.init(params), checkpoint)`` with
    mid-period params, which differ between replicas, and a global copy that
    the checkpoint replaces). `verify_first_round()` compares what must be
    equal, the global copy, before the first round mixes anything.

    The unselected leaves (a replica's own sample count, local buffers) may
    differ between replicas: they are checked as ``None`` placeholders, which
    keeps the paths of the params in the error messages.
    """
    check_params(params, f"{who}(...).init")
    check_has_tensor(_tree.tree_leaves(params), f"{who}(...).init")
    if mode is None:
        return
    leaves, spec, chosen = selected(params, where)
    keep = set(chosen)
    view = _tree.tree_unflatten([leaf if i in keep else None for i, leaf in enumerate(leaves)], spec)
    verify_replicas(view, reduce, "structure")


def verify_first_round(
    rounds: torch.Tensor,
    globals_: Sequence[torch.Tensor],
    params: Params,
    where: _select.Where,
    reduce: Reduce,
    mode: Optional[str],
    who: str,
) -> None:
    """``verify="values"``: the replicas compare their global copies before the first round.

    What every replica must hold alike is the global copy, not the local
    params (they drift apart between rounds). At a fresh start it is the
    params ``init`` copied; a run resumed before its first round loaded it
    from the checkpoint. The check runs while every counter of ``rounds`` is
    0, a test on the state that every replica answers alike, at the first
    step that would communicate, before anything is mixed: a digest of the
    global copy and one small collective (``init`` compared the structure).
    Later rounds keep the copies equal, since every replica applies the same
    averaged update. Without a Reduce that can compare replicas, or under a
    transform, nothing is checked.

    Raises:
      ReplicaMismatchError: on every replica, when the global copies differ.
    """
    if mode != "values" or _types.group_of(reduce) is None:
        return
    if traced(rounds) or any(traced(g) for g in globals_[:1]):
        return
    if bool(torch.any(rounds != 0)):
        return
    with refusing(reduce, True, None):  # the peers are in this check: they learn of it at once
        leaves, spec, chosen = selected(params, where)
        check_match(globals_, [leaves[i] for i in chosen], who)
    by_leaf = dict(zip(chosen, globals_))
    view = _tree.tree_unflatten([by_leaf.get(i) for i in range(len(leaves))], spec)
    try:
        verify_replicas(view, reduce, "values")
    except ReplicaMismatchError as error:
        if error.differs not in ("values", ""):  # a refusal, or a peer in another round: the error says it
            raise
        raise ReplicaMismatchError(
            f"{who}: the replicas hold different global params at the first round (init was "
            "given params that differ between them: broadcast the params, or load them from one "
            "checkpoint, before init); nothing was averaged. Round(verify='structure') checks "
            "only the structure, at init"
        ) from error


def snapshot(leaves: Sequence[torch.Tensor], device: Optional[torch.device] = None) -> tuple[torch.Tensor, ...]:
    """Fresh copies of ``leaves`` in their `master_dtype()` (never aliases), on ``device`` if given.

    A copy kept on the CPU of an accelerator's leaf is pinned (page-locked),
    so that the copies to and from the accelerator at each round are fast.
    A DTensor leaf stays on its mesh's devices: another ``device`` is refused.
    """
    if device is None:
        return tuple(leaf.detach().to(master_dtype(leaf.dtype), copy=True) for leaf in leaves)
    out = []
    for leaf in leaves:
        if _sharded.is_dtensor(leaf):
            if not _same_device(leaf.device, device):
                raise ValueError(
                    f"global_device={str(device)!r}: the params are DTensors on {leaf.device.type} "
                    "meshes, and their global copy is sharded like them, on the mesh's devices; "
                    "pass global_device=None"
                )
            out.append(leaf.detach().to(master_dtype(leaf.dtype), copy=True))
            continue
        copy = leaf.detach().to(device=device, dtype=master_dtype(leaf.dtype), copy=True)
        if device.type == "cpu" and leaf.device.type != "cpu" and torch.cuda.is_available():
            copy = copy.pin_memory()
        out.append(copy)
    return tuple(out)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_global_device(value: Any) -> Optional[torch.device]:
    """Validate a ``global_device`` argument (``None``: the params' own device)."""
    if value is None:
        return None
    try:
        return torch.device(value)
    except (TypeError, RuntimeError) as error:
        raise TypeError(
            "global_device must be None (keep the global copy on the params' device) or a device "
            f'such as "cpu" or torch.device("cuda:0"), got {value!r}'
        ) from error


def counter(leaves: Sequence[torch.Tensor], shape: tuple[int, ...] = ()) -> torch.Tensor:
    """An int64 zero counter on the device of the first leaf (CPU without leaves).

    Batched like the leaves under vmap, so ``vmap(init)`` gives the strides ``update`` returns.
    """
    return zeros_like_batch(leaves, shape)


def check_match(globals_: Sequence[torch.Tensor], local: Sequence[torch.Tensor], who: str) -> None:
    """Raise ``ValueError`` when the state's global copy does not fit the params.

    At a step that communicates, call it inside
    `avgfn._round.engine.refusing`: the peers then learn of the failure.
    """
    if len(globals_) != len(local):
        raise ValueError(
            f"{who}: the state holds a global copy of {len(globals_)} leaves but `where` selects "
            f"{len(local)} leaves of params (was the state made by init for these params? With "
            "ModuleAverager's torch filter, a trainable parameter without a .grad at this step "
            "leaves the selection)"
        )
    for k, (g, x) in enumerate(zip(globals_, local)):
        if g.shape != x.shape:
            raise ValueError(
                f"{who}: selected leaf {k} has shape {tuple(x.shape)} but its global copy in the "
                f"state has shape {tuple(g.shape)} (was the state made by init for these params?)"
            )


def all_finite(
    tensors: Sequence[torch.Tensor], step: Optional[int] = None, timeout: Optional[float] = None
) -> torch.Tensor:
    """A 0-d bool tensor: every element of every tensor is finite.

    One read of each tensor, without a host read (the round engine's test,
    `avgfn._round.health.finite()`). DTensors (sharded params) are judged on
    every shard: the answer is a plain tensor, the same on every rank of
    their mesh; ``step`` (the round's) travels with that verdict, and
    ``timeout`` (seconds, the round's Reduce's: `avgfn._core.types.timeout_of`)
    bounds the wait for the other shards (see `avgfn._round.sharded.everywhere`).
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    ok = _finite(list(tensors))
    if _sharded.any_dtensor(list(tensors)):
        return _sharded.everywhere(ok, list(tensors), step, timeout)
    return ok


def eager_check(ok: torch.Tensor, error: Callable[[], BaseException]) -> None:
    """Raise ``error()`` unless ``ok``; under a transform, do nothing.

    A value cannot stop a program under ``torch.func.vmap`` or
    ``torch.compile``: there the callers keep the old values with
    ``torch.where`` instead (as the core's ``nonfinite="raise"`` does).
    """
    if traced(ok):
        return
    if not bool(ok):
        raise error()


def at_step(step: int) -> Any:
    """A context that names ``step`` in the [`avgfn.AveragingError`][avgfn.AveragingError] it lets through."""
    return _AtStep(step)


class _AtStep:
    __slots__ = ("step",)

    def __init__(self, step: int) -> None:
        self.step = step

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> Literal[False]:
        if isinstance(error, AveragingError) and error.step is None:
            raise error.at_step(self.step) from error
        return False


def where_tree(flag: torch.Tensor, if_true: Any, if_false: Any) -> Any:
    """Leafwise ``torch.where(flag, a, b)`` over two trees of the same structure."""
    a, spec = _tree.tree_flatten(if_true)
    b, _ = _tree.tree_flatten(if_false)
    out = [torch.where(flag, x, y) if isinstance(x, torch.Tensor) else x for x, y in zip(a, b)]
    return _tree.tree_unflatten(out, spec)


def to_local(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A fresh tensor with ``value``'s values and ``like``'s dtype and device (and grad flag)."""
    out = value.to(device=like.device, dtype=like.dtype, copy=True)
    if like.requires_grad:
        out.requires_grad_(True)
    return out


def mean_policy(nonfinite: str) -> str:
    """The core ``nonfinite`` policy for the Reduce round of an outer step.

    ``"exclude"`` is the core's (healthy replicas average among themselves);
    otherwise the round itself does not check (``"ignore"``): the outer step
    checks the mean, which every replica shares, and raises or skips.
    """
    return "exclude" if nonfinite == "exclude" else "ignore"


def with_settings(who: str, outer: Optional[Optimizer], **options: Any) -> str:
    """``who`` followed by what decides its outer step: ``options``, then the outer optimizer's settings.

    It names the averager in the per-round check (`plain_mean()`'s ``who``):
    replicas built with another outer learning rate, momentum or mixing
    would otherwise average the same pseudo-gradients and apply them
    differently, their global copies drifting apart without an error. An
    outer optimizer built by hand (no `avgfn.optim.Optimizer.settings`) is
    not compared, nor is a learning-rate schedule (named ``schedule``).
    """
    parts = [who, *(f"{key}={value!r}" for key, value in options.items())]
    if outer is not None and outer.settings:
        parts.append(f"outer {outer.settings}")
    return ", ".join(parts)


def plain_mean(reduce: Reduce, rnd: Round, who: str) -> Mean:
    """The unweighted group mean of a tuple of tensors, through the round engine.

    ``who`` names the averager in the per-round check, so that replicas
    built with averagers of another kind refuse their rounds.
    """
    policy = mean_policy(rnd.nonfinite)
    what = f"pseudo-gradients of {who}"

    def mean(tensors: tuple[torch.Tensor, ...], params: Params, step: int, names: Names) -> Any:
        del params
        averaged, _ = reduce_round(
            list(tensors), reduce, rnd, step=step, names=names, key=None, policy=policy, what=what
        )
        return tuple(averaged), None

    return mean


def pseudo_gradient(
    globals_: Sequence[torch.Tensor], local: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """``global - local`` for each leaf, in the global copy's dtype, on the local leaf's device."""
    return tuple(g.to(x.device) - x.detach().to(g.dtype) for g, x in zip(globals_, local))


def _bad(names: Optional[Names], tensors: Sequence[torch.Tensor]) -> list[str]:
    if names is None:
        return []
    return [name for name, t in zip(names(), tensors) if not bool(torch.isfinite(t).all())]


def _nonfinite_mean(
    who: str, step: int, names: Optional[Names], local: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor]
) -> NonFiniteError:
    mine = _bad(names, local)
    paths = mine or _bad(names, averaged)
    whose = "this replica's local params are" if mine else "a replica's local params are"
    at = f" at {', '.join(paths)}" if paths else ""
    return NonFiniteError(
        f"{who}: the averaged pseudo-gradient is not finite (inf or NaN){at}: {whose} not finite "
        "(or overflowed the wire dtype); the global params and the outer optimizer state are "
        "unchanged (nonfinite='raise')",
        paths=tuple(mine),
    ).at_step(step)


def outer_apply(
    globals_: tuple[torch.Tensor, ...],
    outer_state: Any,
    averaged: Sequence[torch.Tensor],
    valid: Optional[torch.Tensor],
    *,
    outer: Optimizer,
    nonfinite: str,
    who: str,
    step: int,
    names: Optional[Names] = None,
    local: Sequence[torch.Tensor] = (),
    timeout: Optional[float] = None,
) -> tuple[tuple[torch.Tensor, ...], Any, torch.Tensor]:
    """Apply ``outer`` to the global copy with the averaged pseudo-gradient.

    Returns ``(new_globals, new_outer_state, ok)`` where ``ok`` is a 0-d bool
    tensor, False when the round was skipped (a non-finite mean or step, or
    ``valid`` False): then the global copy and the outer state come back
    unchanged. With ``nonfinite="raise"`` a non-finite value raises
    [`avgfn.NonFiniteError`][avgfn.NonFiniteError] instead, except under a transform. The
    decision is taken on values every replica shares (the mean, and the outer
    step applied to it), so all replicas raise or skip together; with
    sharded params every shard of a replica takes that decision together,
    waiting ``timeout`` seconds (the Reduce's) for the others.
    """
    averaged = tuple(a.to(device=g.device, dtype=g.dtype) for a, g in zip(averaged, globals_))
    ok_mean = all_finite(averaged, step, timeout)
    if nonfinite == "raise":
        eager_check(ok_mean, lambda: _nonfinite_mean(who, step, names, local, averaged))
    stepped, new_state = outer.update(averaged, outer_state, globals_)
    stepped = tuple(stepped)
    ok_step = all_finite(stepped, step, timeout)
    if nonfinite == "raise":
        eager_check(
            ok_step,
            lambda: NonFiniteError(
                f"{who}: the outer optimizer step made the global params non-finite; they and "
                "the outer optimizer state are unchanged (nonfinite='raise')"
            ).at_step(step),
        )
    ok = ok_mean & ok_step
    if valid is not None:  # decided where the pseudo-gradients are, the params' device
        ok = ok & valid.to(ok.device)
    elif nonfinite == "raise" and not traced(ok):
        return stepped, new_state, ok  # both checks passed: nothing to keep
    stepped = tuple(torch.where(ok, s, g) for s, g in zip(stepped, globals_))
    new_state = where_tree(ok, new_state, outer_state)
    return stepped, new_state, ok


def outer_round(
    globals_: tuple[torch.Tensor, ...],
    outer_state: Any,
    local: Sequence[torch.Tensor],
    *,
    mean: Mean,
    outer: Optimizer,
    nonfinite: str,
    who: str,
    params: Params,
    step: int,
    names: Names,
    timeout: Optional[float] = None,
) -> tuple[tuple[torch.Tensor, ...], Any, torch.Tensor]:
    """One outer round: average ``global - local``, then `outer_apply()`."""
    with at_step(step):
        averaged, valid = mean(pseudo_gradient(globals_, local), params, step, names)
    return outer_apply(
        globals_, outer_state, averaged, valid,
        outer=outer, nonfinite=nonfinite, who=who, step=step, names=names, local=local, timeout=timeout,
    )  # fmt: skip


NOTHING_IN_FLIGHT = -1
"""The tag of an average in flight once it was applied (or before the first start)."""


def held_for(
    in_flight: torch.Tensor, expected: Sequence[int], refuse: Callable[[list[int]], str], older: int = -1
) -> Optional[torch.Tensor]:
    """Whether the tag ``in_flight`` (an int64 tensor) says ``expected``: the average is the one due.

    Eagerly: ``None`` when it does; a False 0-d tensor when nothing is in
    flight (the tag starts with `NOTHING_IN_FLIGHT`: its start step was not
    run, or the average was applied already), so the caller skips what it
    would have applied; and ``ValueError(refuse(tag))`` for any other tag (a
    stale or foreign average is never applied). With ``older`` the index of
    the tag's start step, a tag started before the expected one (its apply
    step was skipped) is dropped like nothing in flight instead of refused.
    Under a transform the answer is a tensor, and a tag that does not match
    is a skipped round.
    """
    want = torch.tensor(list(expected), dtype=torch.int64, device=in_flight.device).reshape(in_flight.shape)
    if traced(in_flight):
        return (in_flight == want).all()
    held = [int(v) for v in in_flight.reshape(-1).tolist()]
    if held == list(expected):
        return None
    if held[0] == NOTHING_IN_FLIGHT or (older >= 0 and held[older] < expected[older]):
        return torch.zeros((), dtype=torch.bool, device=in_flight.device)
    raise ValueError(refuse(held))


def write_back(
    leaves: list[Any], spec: Any, chosen: Sequence[int], values: Sequence[torch.Tensor]
) -> Params:
    """The params with leaves ``chosen`` replaced by fresh local copies of ``values``."""
    new_leaves = list(leaves)
    for i, value in zip(chosen, values):
        new_leaves[i] = to_local(value, leaves[i])
    return _tree.tree_unflatten(new_leaves, spec)


@record
class DiLoCoState(Record):
    """State of [`diloco()`][avgfn.diloco] (and of [`avgfn.fedavgm()`][avgfn.fedavgm]).

    Attributes:
      rounds: int64 count of the outer rounds done (skipped ones included).
      skipped: int64 count of the rounds skipped for a non-finite
        pseudo-gradient (or, for [`avgfn.fedavgm()`][avgfn.fedavgm], invalid weights).
      global_params: the global copy of the params: a tuple with one tensor
        per selected leaf, in tree order, in at least float32.
      outer: the outer optimizer's state over ``global_params``.
    """

    rounds: torch.Tensor
    skipped: torch.Tensor
    global_params: tuple[torch.Tensor, ...]
    outer: Any


def default_outer() -> Optimizer:
    """DiLoCo's outer optimizer: Nesterov SGD, lr 0.7, momentum 0.9."""
    return sgd(0.7, momentum=0.9, nesterov=True)


OUTER_ROUND = ("bucket_bytes", "comm_dtype", "nonfinite", "verify", "agree")
"""The [`avgfn.Round`][avgfn.Round] options an outer step honours (its global copy is never donated)."""


def outer_options(
    who: str,
    outer_optimizer: Optional[Optimizer],
    where: _select.Where,
    round: Optional[Round],
    deprecated: Any,
    nonfinite: Sequence[str] = OUTER_NONFINITE,
) -> tuple[Optimizer, Round]:
    """Validate the options the outer-step averagers share; fill in the default outer step."""
    outer = default_outer() if outer_optimizer is None else check_outer_optimizer(
        "outer_optimizer", outer_optimizer
    )
    _select.check_where(where)
    rnd = round_options(
        who, round, deprecated, nonfinite=nonfinite, verify="values", allowed=OUTER_ROUND, stacklevel=4
    )
    return outer, rnd


def outer_averager(
    who: str,
    period: int,
    *,
    reduce: Reduce,
    outer: Optimizer,
    mean: Mean,
    where: _select.Where,
    nonfinite: str,
    verify: Optional[str],
    global_device: Optional[torch.device] = None,
    agree: bool = True,
) -> Averager:
    """The averager behind [`diloco()`][avgfn.diloco] and [`avgfn.fedavgm()`][avgfn.fedavgm].

    ``global_device``: where the global copy and the outer state live
    (``None``: on the params' device); ``agree``: the round's agreement is on.
    """

    def init(params: Params) -> DiLoCoState:
        verify_selected(params, where, reduce, verify, who)
        leaves, _, chosen = selected(params, where)
        local = [leaves[i] for i in chosen]
        globals_ = snapshot(local, global_device)
        zero = counter(local)
        return DiLoCoState(zero, zero.clone(), globals_, outer.init(globals_))

    def update(params: Params, state: DiLoCoState, step: int) -> tuple[Params, DiLoCoState]:
        step = check_step(step)
        if (step + 1) % period:
            check_update(params, state, DiLoCoState, who)
            return params, state
        with refusing(reduce, agree, step):  # the peers are in the round: they learn of it at once
            check_update(params, state, DiLoCoState, who)
            leaves, spec, chosen = selected(params, where, f"{who}(...).update")
            local = [leaves[i] for i in chosen]
            check_match(state.global_params, local, who)
        with at_step(step):
            verify_first_round(state.rounds, state.global_params, params, where, reduce, verify, who)
        new_globals, new_outer, ok = outer_round(
            state.global_params, state.outer, local, mean=mean, outer=outer, nonfinite=nonfinite,
            who=who, params=params, step=step, names=_tree.lazy_paths(params, chosen),
            timeout=_types.timeout_of(reduce),
        )  # fmt: skip
        skipped = state.skipped + (~ok).to(state.skipped.device, state.skipped.dtype)
        new_params = write_back(leaves, spec, chosen, new_globals)
        return new_params, DiLoCoState(state.rounds + 1, skipped, new_globals, new_outer)

    return Averager(init=init, update=update)
