"""DiLoCo: local steps, then an outer optimizer step on the averaged pseudo-gradient."""

from __future__ import annotations

from typing import Any, Optional

from avgfn._algorithms.outer import check_global_device, outer_averager, outer_options, plain_mean, with_settings
from avgfn._core import select as _select
from avgfn._core.checks import check_int, check_reduce
from avgfn._core.types import Averager, Reduce
from avgfn._round.options import Round
from avgfn.optim._base import Optimizer

__all__ = ["diloco"]


def diloco(
    period: int,
    *,
    reduce: Reduce,
    outer_optimizer: Optional[Optimizer] = None,
    where: _select.Where = None,
    round: Optional[Round] = None,
    global_device: Any = None,
    **deprecated: Any,
) -> Averager:
    """DiLoCo (Douillard et al., 2023): an outer optimizer over H local steps.

    The state keeps a global copy of the params. Every ``period`` steps (at
    the steps with ``(step + 1) % period == 0``, i.e. after ``period`` local
    steps) each replica forms the pseudo-gradient ``global - local``, the
    group averages it with ``reduce``, the outer optimizer applies it to the
    global copy, and the local params restart from the new global params.
    Between those steps ``update`` returns its inputs untouched.

    With ``outer_optimizer=avgfn.optim.sgd(1.0)`` this is periodic averaging
    (``avgfn.periodic(period, warmup_steps=period - 1)``) up to rounding.

    All replicas must start from the same params (broadcast them before
    ``init``). When the Reduce can compare replicas, ``init`` checks that
    they hold params of one structure, and the first round (before anything
    is mixed) that they hold the same global copy (``verify``). So a resume
    rebuilds its state from mid-period params, which differ between replicas,
    as for any averager: ``avgfn.load_state_dict(avg.init(params), checkpoint)``
    (see ``docs/checkpoints.md``).

    Args:
      period: the number of local steps between two outer steps (``H``), ``>= 1``.
      reduce: the mean over the group (see [`avgfn.Reduce`][avgfn.Reduce]).
      outer_optimizer: any [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer]; default
        ``avgfn.optim.sgd(0.7, momentum=0.9, nesterov=True)``, the paper's.
      where: which leaves are synchronized (see [`avgfn.average()`][avgfn.average]); the
        others pass through untouched.
      round: the [`avgfn.Round`][avgfn.Round] options of the pseudo-gradient's round:
        ``comm_dtype``, ``bucket_bytes``, the per-round agreement, ``verify``
        (default ``"values"``: at the first round, before anything is mixed,
        the replicas must hold the same global copy, i.e. have started from
        identical values of the selected leaves; ``init`` checks the
        structure) and ``nonfinite``, one of ``"raise"``
        (default: every replica raises [`avgfn.NonFiniteError`][avgfn.NonFiniteError] and
        nothing changes; under ``vmap`` or ``torch.compile`` the round is
        skipped instead), ``"skip"`` (the global params and outer state are
        kept, the local params restart from them, ``state.skipped`` counts
        the round) or ``"exclude"`` (the healthy replicas' pseudo-gradients
        are averaged among themselves). The global params are never
        corrupted; the global copy is never donated.
      global_device: where the global copy and the outer optimizer's state
        live (``"cpu"``, ``torch.device("cuda:1")``...); ``None`` (default)
        keeps them on the params' device. On the CPU next to accelerator
        params they are pinned: the pseudo-gradient is formed and averaged
        on the params' device, then the outer step runs where the copy is,
        sparing accelerator memory (as torchft's ``backup_device``).
      **deprecated: the round options as keywords (``nonfinite="skip"``...),
        their spelling before [`avgfn.Round`][avgfn.Round]; they warn.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`DiLoCoState`][avgfn.DiLoCoState].

    Raises:
      ValueError: ``period < 1``, an unknown ``nonfinite`` or ``verify``.
      TypeError: a non-integer ``period``, a non-callable ``reduce``, an
        ``outer_optimizer`` that is not an [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer], a
        ``global_device`` that names no device.
      NonFiniteError: from ``update``, with ``nonfinite="raise"``.

    Examples:
      >>> import torch, avgfn
      >>> peer = lambda t: torch.zeros_like(t)          # the other replica's pseudo-gradient
      >>> avg = avgfn.diloco(3, reduce=avgfn.testing.peers_mean(peer),
      ...                    outer_optimizer=avgfn.optim.sgd(1.0))
      >>> params = {"w": torch.tensor([1.0])}
      >>> state = avg.init(params)
      >>> for step in range(3):
      ...     params = {"w": params["w"] - 0.5}            # a local step
      ...     params, state = avg.update(params, state, step)
      >>> params["w"], state.global_params[0], int(state.rounds)   # 1 - 1.5 / 2
      (tensor([0.2500]), tensor([0.2500]), 1)
    """
    period = check_int("period", period, minimum=1)
    check_reduce("reduce", reduce)
    device = check_global_device(global_device)
    outer, rnd = outer_options("diloco", outer_optimizer, where, round, deprecated)
    return outer_averager(
        "diloco", period, reduce=reduce, outer=outer, mean=plain_mean(reduce, rnd, with_settings("diloco", outer)),
        where=where, nonfinite=rnd.nonfinite, verify=rnd.verify, global_device=device, agree=rnd.agree,
    )  # fmt: skip

