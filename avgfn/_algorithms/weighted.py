"""Weighted averaging (FedAvg) and server momentum (FedAvgM)."""

from __future__ import annotations

import math
import warnings
import numbers
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from avgfn._core.traced import traced
from avgfn._core import select as _select
from avgfn._core import tree as _tree
import attrs

from avgfn._round.options import Round, round_options
from avgfn._round.engine import Names, reduce_round, refusing
from avgfn._core.types import Averager, Params, Reduce, timeout_of
from avgfn._core.checks import (
    check_has_tensor,
    check_int,
    check_params,
    check_reduce,
    check_reduced,
    check_step,
    check_update,
)
from avgfn._algorithms.outer import (
    all_finite,
    at_step,
    counter,
    eager_check,
    check_global_device,
    outer_averager,
    outer_options,
    selected,
    with_settings,
)
from avgfn._core.errors import NonFiniteError
from avgfn._core.records import Record, record
from avgfn._round.agree import lanes_entry, start_round
from avgfn._round.agree import verify as verify_replicas
from avgfn.optim._base import check_float
from avgfn.optim._sgd import sgd

__all__ = ["WeightedState", "fedavg", "fedavgm", "weighted"]


def _wire(
    rnd: Round, reduce: Reduce, who: str, what: str = "params", settings: str = "", judged: str = ""
) -> str:
    """What decides a weighted round's collectives besides its leaves, and what it returns (compared by its check).

    ``settings``: more of what decides the result (fedavgm's outer step);
    ``judged``: the averager's own ``nonfinite`` where the round's differs.
    Its data round runs without a check of its own, so the lanes of
    ``reduce`` are compared here.
    """
    policy = f"{judged} (this round {rnd.nonfinite})" if judged and judged != rnd.nonfinite else rnd.nonfinite
    return (
        f"{who}: averages={what}{settings}, comm_dtype={rnd.comm_dtype}, bucket_bytes={rnd.bucket_bytes}, "
        f"donate={rnd.donate}, nonfinite={policy}, error_feedback={rnd.error_feedback}{lanes_entry(reduce)}"
    )

# numbers.Real: any real number is accepted (a Fraction, a NumPy scalar), not only float and int.
Weight = Union[
    float, int, numbers.Real, torch.Tensor, Callable[[Params, int], Union[float, int, torch.Tensor]]
]
"""This replica's weight: a number, a one-element tensor, or ``(params, step) -> weight``."""


def check_weight(weight: Any) -> Weight:
    """Validate ``weight`` at construction (a callable is checked when called)."""
    if isinstance(weight, bool):
        raise TypeError(f"weight must be a number, a one-element tensor or a callable, got bool {weight!r}")
    if isinstance(weight, numbers.Real):
        value = float(weight)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
        return weight
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1 or weight.is_complex() or weight.dtype == torch.bool:
            raise TypeError(
                f"weight must be a one-element real tensor, got a {weight.dtype} tensor of shape "
                f"{tuple(weight.shape)}"
            )
        return weight
    if callable(weight):
        return weight
    raise TypeError(
        "weight must be a number, a one-element tensor, or a callable (params, step) -> weight, "
        f"got {type(weight).__name__} {weight!r}"
    )


def _weight_value(weight: Weight, params: Params, step: int, device: torch.device) -> torch.Tensor:
    value = weight(params, step) if callable(weight) and not isinstance(weight, torch.Tensor) else weight
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(
            f"weight(params, step) must return a number or a one-element tensor, got "
            f"{type(value).__name__} {value!r}"
        )
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"weight(params, step) must return a one-element real tensor, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def weighted_mean(
    tensors: tuple[torch.Tensor, ...],
    reduce: Reduce,
    weight: torch.Tensor,
    rnd: Round,
    invalid: str,
    who: str,
    step: int,
    names: Names,
    what: str = "params",
    settings: str = "",
    judged: str = "",
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``sum_i w_i x_i / sum_i w_i`` over the group, with two Reduce calls.

    The first call averages ``[w, bad]`` in float64 (``bad`` is 1 on a replica
    whose weight is negative or not finite); the second averages the tensors
    scaled by ``w / mean(w)`` (exactly 1.0 when the weights are equal, so equal
    weights give the plain mean bit for bit), in at least float32. Returns
    the means, in the tensors' dtypes, and a 0-d bool tensor that is False when
    the round is invalid (some weight bad, or all zero): then the means are the
    tensors themselves (``what`` names them in the check: ``"params"``, or
    fedavgm's ``"pseudo-gradients"``). Every replica sees the same decision; with
    ``invalid="raise"`` every replica raises ``ValueError`` instead (eagerly;
    under a transform the round is skipped). The second call is made in every
    case, so that all replicas make the same calls.
    """
    # Before the weights move the replicas agree on the leaves and the step (not while
    # torch.compile traces: the check is host-side, and skipped there, see docs/round.md).
    if rnd.agree and not torch.compiler.is_compiling():
        wire = _wire(rnd, reduce, who, what, f"{settings}, invalid_weights={invalid}", judged)
        start_round(list(tensors), reduce, step, names, None, wire).wait()
        rnd = attrs.evolve(rnd, agree=False)
    bad = (weight < 0) | ~torch.isfinite(weight)
    info = torch.stack([torch.where(bad, torch.zeros_like(weight), weight), bad.to(torch.float64)])
    info = check_reduced(reduce(info), info).detach()  # weights: no autograd
    mean_w, any_bad = info[0], info[1]
    ok = (any_bad == 0) & (mean_w > 0) & torch.isfinite(mean_w)
    if invalid == "raise":
        eager_check(
            ok,
            lambda: ValueError(
                f"{who}: invalid weights at step {step}: a replica's weight is negative or not "
                "finite, or every weight is zero; the params are unchanged (invalid_weights='raise')"
            ),
        )
    one = torch.ones_like(weight)
    factor = torch.where(ok, weight / torch.where(ok, mean_w, one), one)
    scaled = []
    for t in tensors:
        dtype = torch.promote_types(t.dtype, torch.float32)
        scaled.append(t.detach().to(dtype) * factor.to(dtype))
    means, _ = reduce_round(scaled, reduce, rnd, step=step, names=names, policy="ignore")
    out = tuple(torch.where(ok, m.to(t.dtype), t) for m, t in zip(means, tensors))
    return out, ok


def _check_params_health(
    nonfinite: str,
    params: Params,
    chosen: list[int],
    local: tuple[torch.Tensor, ...],
    means: tuple[torch.Tensor, ...],
    step: int,
    timeout: Optional[float] = None,
) -> tuple[torch.Tensor, ...]:
    """``nonfinite="raise"`` for a weighted round: the core's semantics.

    Eagerly, a non-finite mean raises [`avgfn.NonFiniteError`][avgfn.NonFiniteError] naming this
    replica's non-finite leaves; under a transform each leaf whose mean is not
    finite keeps its old value.
    """
    if nonfinite == "ignore" or not means:
        return means
    if traced(means[0]):
        return tuple(
            torch.where(torch.isfinite(m).all(), m, x.detach().to(m.dtype)) for m, x in zip(means, local)
        )
    if bool(all_finite(means, step, timeout)):
        return means
    if nonfinite == "skip":
        return local
    mine = [_tree.path_of(params, i) for i, x in zip(chosen, local) if not bool(all_finite([x], step, timeout))]
    where = (
        f"this replica holds non-finite values at {', '.join(mine)}"
        if mine
        else "a peer replica holds non-finite values"
    )
    raise NonFiniteError(
        f"{where}; nothing was averaged (nonfinite='raise')", paths=tuple(mine)
    ).at_step(step)


def check_invalid_weights(value: Any, deprecated: dict[str, Any], who: str) -> str:
    """Validate ``invalid_weights`` (``invalid``, its old spelling, warns)."""
    if "invalid" in deprecated:
        warnings.warn(
            f"{who}(invalid=...) is deprecated: pass invalid_weights={deprecated['invalid']!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        value = deprecated.pop("invalid")
    if value not in ("raise", "skip"):
        raise ValueError(f"{who}: invalid_weights must be one of ['raise', 'skip'], got {value!r}")
    return value


WEIGHTED_ROUND = ("bucket_bytes", "comm_dtype", "nonfinite", "verify", "agree")


@record
class WeightedState(Record):
    """State of [`weighted()`][avgfn.weighted] and [`fedavg()`][avgfn.fedavg].

    Attributes:
      rounds: int64 count of the averaging rounds (skipped ones included).
      skipped: int64 count of the rounds skipped: for invalid weights, or,
        with ``nonfinite="skip"``, for non-finite params on some replica.
    """

    rounds: torch.Tensor
    skipped: torch.Tensor


def weighted(
    period: int,
    *,
    reduce: Reduce,
    weight: Weight,
    warmup_steps: int = 0,
    where: _select.Where = None,
    invalid_weights: str = "raise",
    round: Optional[Round] = None,
    **deprecated: Any,
) -> Averager:
    """Average the params with per-replica weights, on [`avgfn.periodic()`][avgfn.periodic]'s schedule.

    At ``step >= warmup_steps`` with ``(step - warmup_steps) % period == 0``
    every replica's params become ``sum_i w_i x_i / sum_i w_i`` over the
    group, where ``w_i`` is replica i's ``weight`` (for FedAvg, the number of
    samples it trained on). Equal weights give [`avgfn.periodic()`][avgfn.periodic] bit for
    bit (for float32 and float64 params).

    The weight is communicated with the same Reduce: one extra call on a
    float64 buffer of two elements (the weight and an invalid flag) before
    the call on the scaled params.

    Args:
      period: steps between two averagings, ``>= 1``.
      reduce: the mean over the group.
      weight: this replica's weight: a number ``>= 0`` or a one-element
        tensor (on a real process group each rank builds its own averager
        with its own weight), or a callable ``(params, step) -> weight`` (for
        example ``lambda p, step: p["num_samples"]``, which under ``vmap``
        gives each simulated replica its own weight from a leaf of its params).
      warmup_steps: steps before the first averaging, ``>= 0``.
      where: which leaves to average (see [`avgfn.average()`][avgfn.average]).
      invalid_weights: a round whose weights are invalid (a negative or
        non-finite weight on some replica, or all weights zero): ``"raise"``
        (default) raises ``ValueError`` on every replica and changes nothing
        (under ``vmap`` or ``torch.compile``, where a value cannot stop the
        program, the round is skipped instead); ``"skip"`` leaves the params
        as they are. Skipped rounds are counted in ``state.skipped``.
      round: the [`avgfn.Round`][avgfn.Round] options: ``comm_dtype``,
        ``bucket_bytes``, ``verify`` (default ``"structure"``; ``"values"``
        compares the params given to ``init``, so a mid-period resume builds
        its template with ``"structure"``: see ``docs/checkpoints.md``), the
        per-round agreement, and ``nonfinite`` for non-finite params: ``"raise"``
        (default), ``"skip"`` or ``"ignore"`` (``"exclude"`` is not offered:
        it would need the unhealthy replicas' weights removed too).
      **deprecated: the round options as keywords, and ``invalid`` (now
        ``invalid_weights``): their spelling before; they warn.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`WeightedState`][avgfn.WeightedState].

    Raises:
      ValueError: ``period < 1``, ``warmup_steps < 0``, a negative or
        non-finite constant ``weight``, an unknown ``invalid``, ``nonfinite``
        or ``verify``; from ``update``, invalid weights (``invalid="raise"``).
      TypeError: a ``weight`` of the wrong type, a non-callable ``reduce``.
      NonFiniteError: from ``update``, non-finite params (``nonfinite="raise"``).

    Examples:
      >>> import torch, avgfn
      >>> from avgfn import simulate
      >>> avg = avgfn.weighted(1, reduce=simulate.replica_mean(), weight=lambda p, step: p["n"])
      >>> stacked = {"w": torch.tensor([[2.0], [10.0]]), "n": torch.tensor([3, 1])}  # 2 replicas
      >>> state = torch.func.vmap(avg.init)(stacked)
      >>> new, state = torch.func.vmap(avg.update, in_dims=(0, 0, None))(stacked, state, 0)
      >>> new["w"]                           # (3 * 2 + 1 * 10) / 4 on both replicas
      tensor([[4.],
              [4.]])
    """
    period = check_int("period", period, minimum=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    check_reduce("reduce", reduce)
    weight = check_weight(weight)
    _select.check_where(where)
    invalid = check_invalid_weights(invalid_weights, deprecated, "weighted")
    rnd = round_options(
        "weighted", round, deprecated, nonfinite=("raise", "skip", "ignore"), allowed=WEIGHTED_ROUND
    )
    nonfinite, verify = rnd.nonfinite, rnd.verify

    def init(params: Params) -> WeightedState:
        check_params(params, "weighted(...).init")
        check_has_tensor(_tree.tree_leaves(params), "weighted(...).init")
        verify_replicas(params, reduce, verify)
        leaves, _, chosen = selected(params, where)
        zero = counter([leaves[i] for i in chosen])
        return WeightedState(zero, zero.clone())

    def update(params: Params, state: WeightedState, step: int) -> tuple[Params, WeightedState]:
        step = check_step(step)
        if step < warmup_steps or (step - warmup_steps) % period:
            check_update(params, state, WeightedState, "weighted")
            return params, state
        with refusing(reduce, rnd.agree, step):  # the peers are in the round: they learn of it at once
            check_update(params, state, WeightedState, "weighted")
            leaves, spec, chosen = selected(params, where, "weighted(...).update")
            w = _weight_value(weight, params, step, state.rounds.device) if chosen else None
        if w is None:  # nothing selected
            if rnd.agree:  # the peers must learn that this replica averages nothing
                start_round([], reduce, step, lambda: [], None, _wire(rnd, reduce, "weighted")).wait()
            return params, state.replace(rounds=state.rounds + 1)
        local = tuple(leaves[i] for i in chosen)
        with at_step(step):
            means, ok = weighted_mean(
                local, reduce, w, rnd, invalid, "weighted", step, _tree.lazy_paths(params, chosen)
            )
        kept = False
        if traced(local[0]) or bool(ok):  # a round skipped for its weights averaged nothing to check
            checked = _check_params_health(nonfinite, params, chosen, local, means, step, timeout_of(reduce))
            # "skip": non-finite params on some replica (traced, the check never skips a round)
            kept = False if traced(local[0]) else checked is local
            means = checked
        new_leaves = list(leaves)
        for i, value in zip(chosen, means):
            if leaves[i].requires_grad:
                value = value.detach().requires_grad_(True)
            new_leaves[i] = value
        skipped = state.skipped + (~ok).to(state.skipped.dtype) + int(kept)
        return _tree.tree_unflatten(new_leaves, spec), WeightedState(state.rounds + 1, skipped)

    return Averager(init=init, update=update)


def fedavg(
    period: int,
    *,
    reduce: Reduce,
    weight: Weight,
    where: _select.Where = None,
    invalid_weights: str = "raise",
    round: Optional[Round] = None,
    **deprecated: Any,
) -> Averager:
    """FedAvg (McMahan et al., 2017): a weighted average after every ``period`` local steps.

    The schedule of [`avgfn.diloco()`][avgfn.diloco]: the average is taken at the steps
    with ``(step + 1) % period == 0``. Exactly
    ``weighted(period, warmup_steps=period - 1, ...)``; see [`weighted()`][avgfn.weighted]
    for the arguments.

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.fedavg(3, reduce=lambda t: t, weight=100)
      >>> params = {"w": torch.zeros(1)}
      >>> state = avg.init(params)
      >>> [avg.update(params, state, s)[0] is not params for s in range(6)]
      [False, False, True, False, False, True]
    """
    period = check_int("period", period, minimum=1)
    return weighted(
        period, reduce=reduce, weight=weight, warmup_steps=period - 1, where=where,
        invalid_weights=check_invalid_weights(invalid_weights, deprecated, "fedavg"), round=round,
        **deprecated,
    )  # fmt: skip


def fedavgm(
    period: int,
    *,
    reduce: Reduce,
    weight: Weight,
    server_lr: float = 1.0,
    server_momentum: float = 0.0,
    where: _select.Where = None,
    invalid_weights: str = "raise",
    round: Optional[Round] = None,
    global_device: Any = None,
    **deprecated: Any,
) -> Averager:
    """FedAvgM (Hsu et al., 2019): FedAvg with server learning rate and momentum.

    [`avgfn.diloco()`][avgfn.diloco] with two changes: the pseudo-gradient
    ``global - local`` is averaged with the replicas' weights (as
    [`weighted()`][avgfn.weighted] does), and the outer optimizer is heavy-ball SGD,
    ``avgfn.optim.sgd(server_lr, momentum=server_momentum)``: the server keeps
    ``v = server_momentum * v + delta`` (``v = delta`` on the first round) and
    sets ``global = global - server_lr * v``, as Flower's ``FedAvgM`` does.
    Rounds are at the steps with ``(step + 1) % period == 0``.

    Args:
      period: local steps per round, ``>= 1``.
      reduce: the mean over the group.
      weight: this replica's weight (see [`weighted()`][avgfn.weighted]).
      server_lr: the server learning rate (Flower's ``server_learning_rate``), ``>= 0``.
      server_momentum: the server momentum (Flower's ``server_momentum``), ``>= 0``.
      where: which leaves are synchronized.
      invalid_weights: ``"raise"`` (default) or ``"skip"``, for a round
        whose weights are invalid (see [`weighted()`][avgfn.weighted]).
      round: the [`avgfn.Round`][avgfn.Round] options, as in [`avgfn.diloco()`][avgfn.diloco]
        (``nonfinite`` ``"raise"`` or ``"skip"``: excluding would need the
        weights removed too; ``verify`` defaults to ``"values"``: the clients
        start from the server's params, whose copies are compared at the
        first round, before anything is mixed).
      global_device: where the server's params (the global copy) and its
        momentum live, as in [`avgfn.diloco()`][avgfn.diloco] (``None``: the
        params' device).
      **deprecated: the round options as keywords, their spelling before
        [`avgfn.Round`][avgfn.Round]; they warn. ``nonfinite="skip"`` there also
        skips rounds with invalid weights, as it did.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`avgfn.DiLoCoState`][avgfn.DiLoCoState].

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.fedavgm(2, reduce=lambda t: t, weight=1.0, server_lr=1.0, server_momentum=0.5)
      >>> params = {"w": torch.tensor([4.0])}
      >>> state = avg.init(params)
      >>> for step in range(4):
      ...     params, state = avg.update({"w": params["w"] - 1.0}, state, step)
      >>> params["w"]                       # deltas 2 then 2 + 0.5 * 2: 4 - 2 - 3
      tensor([-1.])
    """
    period = check_int("period", period, minimum=1)
    check_reduce("reduce", reduce)
    weight = check_weight(weight)
    server_lr = check_float("server_lr", server_lr)
    server_momentum = check_float("server_momentum", server_momentum)
    device = check_global_device(global_device)
    _select.check_where(where)
    if deprecated.get("nonfinite") == "skip" and "invalid" not in deprecated:
        invalid_weights = "skip"
    invalid = check_invalid_weights(invalid_weights, deprecated, "fedavgm")
    outer, rnd = outer_options(
        "fedavgm", sgd(server_lr, momentum=server_momentum), where, round, deprecated, ("raise", "skip")
    )
    wire_round = attrs.evolve(rnd, nonfinite="ignore")
    settings = f", outer {outer.settings}" if outer.settings else ""  # the outer step's, compared too

    def mean(tensors: tuple[torch.Tensor, ...], params: Params, step: int, names: Names) -> Any:
        device = tensors[0].device if tensors else torch.device("cpu")
        with refusing(reduce, rnd.agree, step):  # the peers are in the round: they learn of it at once
            w = _weight_value(weight, params, step, device)
        return weighted_mean(
            tensors, reduce, w, wire_round, invalid, "fedavgm", step, names, "pseudo-gradients", settings,
            rnd.nonfinite,
        )

    return outer_averager(
        "fedavgm", period, reduce=reduce, outer=outer, mean=mean, where=where,
        nonfinite=rnd.nonfinite, verify=rnd.verify, agree=rnd.agree, global_device=device,
    )  # fmt: skip
