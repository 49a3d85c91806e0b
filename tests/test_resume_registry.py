"""Resume mid-period in fresh processes, for every averager and for the adapters.

The documented way to resume (``docs/checkpoints.md``) rebuilds the state with
``avgfn.load_state_dict(avg.init(loaded_params), loaded_state)``; the params
loaded then are mid-period, so they differ between replicas. This file checks
that this works, bit for bit, for every entry of the conformance registry
(``test_conformance.REGISTRY``) and for ``avgfn.ModuleAverager`` and
``avgfn.AveragingOptimizer`` around ``diloco`` (the weights are loaded into the
model first, the adapter is built, then the averager state is loaded: the
natural order).

Two 2-process gloo worlds:

* the first runs each scenario uninterrupted for ``STEPS`` steps, and separately
  runs it for ``CHECKPOINT`` steps and saves the params and state with
  ``torch.save``; it also starts the outer-step averagers from params that
  differ between the ranks, which must be caught before any value is mixed;
* the second, fresh processes, loads the checkpoints with
  ``torch.load(weights_only=True)``, rebuilds everything and continues: every
  param at every remaining step equals the uninterrupted run's.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

import avgfn
from _dist import run_world
from test_conformance import FLOAT_KEYS, NAMES, REGISTRY, STEPS, Comm, data, initial_params, make_step, train

WORLD = 2
# After 7 steps every entry is between two averagings (DiLoCo's rounds are at
# steps 3, 7, 11; periodic's at 2, 5, 8, 11; streaming has a fragment in flight...):
# the ranks' params differ, which the test asserts.
CHECKPOINT = 7
# The outer-step averagers: verify="values" by default, so a fresh start from
# params that differ between the replicas must be refused.
VALUES_CHECKED = ("diloco", "diloco_adamw", "diloco_sgd1", "streaming", "streaming_sgd1", "slowmo",
                  "fedavgm", "chain_diloco_ema", "overlapped", "overlapped_delayed")  # fmt: skip

# Checkpoints taken before the first round: the resumed run's first round
# compares the global copies loaded from them (their round counters are 0).
EARLY = {"diloco": 2, "diloco_adamw": 2, "fedavgm": 2, "slowmo": 1, "chain_diloco_ema": 2}

MODULE_STEPS, MODULE_CHECKPOINT, MODULE_PERIOD = 10, 6, 4  # outer rounds at steps 3 and 7


def _comm() -> Comm:
    # hierarchical's entry asks for levels {2: 2, 4: 4}; on two ranks: groups of 1 and 2
    halve = lambda spec: avgfn.collectives.hierarchy({p: max(1, s // 2) for p, s in spec.items()})  # noqa: E731
    return Comm(avgfn.collectives.all_reduce_mean(timeout=60), halve)


class _Counting(avgfn.ForwardingReduce):
    """Counts the buffers handed to the group, and the checks that compared values."""

    buffers = 0
    value_checks = 0

    def observe(self, tensor: torch.Tensor, divided: bool) -> None:
        self.buffers += 1

    def agree(self, digest: bytes, entries: Any) -> None:
        self.value_checks += any(name == "<values>" for name, _ in entries())
        super().agree(digest, entries)


# --- the adapters -----------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def _loss(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = _batch(rank, step)
    return nn.functional.mse_loss(model(x), y)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _diloco() -> avgfn.Averager:
    return avgfn.diloco(MODULE_PERIOD, reduce=avgfn.collectives.all_reduce_mean(timeout=60))


class _ModulePath:
    """A plain torch loop (``torch.optim.SGD``) with ``ModuleAverager(model, diloco)``."""

    def __init__(self, checkpoint: Any = None) -> None:
        self.model = _model()
        if checkpoint is not None:  # the weights first, then the adapter, then its state
            self.model.load_state_dict(checkpoint["model"])
        self.avg = avgfn.ModuleAverager(self.model, _diloco())
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        if checkpoint is not None:
            self.opt.load_state_dict(checkpoint["optimizer"])
            self.avg.load_state_dict(checkpoint["averager"])

    def step(self, rank: int, step: int) -> None:
        self.opt.zero_grad()
        _loss(self.model, rank, step).backward()
        self.opt.step()
        self.avg.step(step)

    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "averager": self.avg.state_dict()}  # fmt: skip


class _OptimizerPath:
    """``AveragingOptimizer(torch.optim.AdamW, ModuleAverager(model, diloco))``."""

    def __init__(self, checkpoint: Any = None) -> None:
        self.model = _model()
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
        inner = torch.optim.AdamW(self.model.parameters(), lr=0.02)
        self.opt = avgfn.AveragingOptimizer(inner, avgfn.ModuleAverager(self.model, _diloco()))
        if checkpoint is not None:
            self.opt.load_state_dict(checkpoint["optimizer"])

    def step(self, rank: int, step: int) -> None:
        assert self.opt.iteration == step
        self.opt.zero_grad()
        _loss(self.model, rank, step).backward()
        self.opt.step()

    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}


ADAPTERS = {"module_averager": _ModulePath, "averaging_optimizer": _OptimizerPath}


def _run_adapter(path: Any, rank: int, steps: range) -> list[torch.Tensor]:
    history = []
    for step in steps:
        path.step(rank, step)
        history.append(_flat(path.model))
    return history


# --- the two worlds ---------------------------------------------------------------------


def _first_world(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    del world_size
    comm = _comm()
    xs, ys = data(rank)
    out: dict[str, Any] = {"registry": {}, "adapters": {}, "fresh": {}}
    for name in NAMES:
        avg = REGISTRY[name].make(comm)
        params = initial_params(rank)
        history, _, state = train(avg, make_step(avg), params, avg.init(params), xs, ys)
        # the same run again from scratch, stopped mid-period and saved
        avg = REGISTRY[name].make(comm)
        params = initial_params(rank)
        _, params, state_k = train(avg, make_step(avg), params, avg.init(params), xs, ys, range(CHECKPOINT))
        torch.save({"params": params, "state": avgfn.state_dict(state_k)}, os.path.join(folder, f"{name}{rank}.pt"))
        out["registry"][name] = {"history": history, "state": avgfn.state_dict(state), "at_checkpoint": params}
        if name in EARLY:
            avg = REGISTRY[name].make(comm)
            params = initial_params(rank)
            _, params, state_k = train(avg, make_step(avg), params, avg.init(params), xs, ys, range(EARLY[name]))
            saved = avgfn.state_dict(state_k)
            torch.save({"params": params, "state": saved}, os.path.join(folder, f"{name}-early{rank}.pt"))
            out["registry"][name]["early_rounds"] = [v for k, v in saved.items() if k.endswith(".rounds")]
            out["registry"][name]["early_params"] = params

    for name, path_type in ADAPTERS.items():
        history = _run_adapter(path_type(), rank, range(MODULE_STEPS))
        path = path_type()
        _run_adapter(path, rank, range(MODULE_CHECKPOINT))
        torch.save(path.checkpoint(), os.path.join(folder, f"{name}{rank}.pt"))
        out["adapters"][name] = {"history": history, "at_checkpoint": _flat(path.model)}

    # A fresh start from params that differ between the ranks: each averager is
    # built, init passes (it checks the structure), and the first round refuses.
    for name in NAMES:
        counting = _Counting(comm.mean)
        avg = REGISTRY[name].make(Comm(counting, comm.hierarchy))
        params = initial_params(rank)
        params["b1"] = params["b1"] + rank  # rank 1 starts elsewhere
        state = avg.init(params)
        outcome: dict[str, Any] = {"error": None, "message": "", "step": None}
        for step in range(STEPS):
            local = {k: v.clone() for k, v in params.items()}
            before = {k: v.clone() for k, v in local.items()}
            state_before = {k: v.clone() for k, v in avgfn.state_dict(state).items()}
            try:
                params, state = avg.update(local, state, step)
            except avgfn.ReplicaMismatchError as error:
                outcome.update(error="ReplicaMismatchError", message=str(error), step=error.step)
                outcome["unchanged"] = all(torch.equal(before[k], local[k]) for k in local) and all(
                    torch.equal(v, state_before[k]) for k, v in avgfn.state_dict(state).items()
                )
                outcome["buffers"] = counting.buffers  # none handed to the group before the refusal
                break
        out["fresh"][name] = outcome
    # the group is still usable afterwards
    out["after"] = avgfn.average({"x": torch.tensor([float(rank)])}, comm.mean)["x"].item()
    return out


def _second_world(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    del world_size
    comm = _comm()
    xs, ys = data(rank)
    out: dict[str, Any] = {"registry": {}, "adapters": {}}
    for name in NAMES:
        saved = torch.load(os.path.join(folder, f"{name}{rank}.pt"), weights_only=True)
        avg = REGISTRY[name].make(comm)
        params = saved["params"]
        state = avgfn.load_state_dict(avg.init(params), saved["state"])  # as docs/checkpoints.md says
        history, _, state = train(avg, make_step(avg), params, state, xs, ys, range(CHECKPOINT, STEPS))
        out["registry"][name] = {"history": history, "state": avgfn.state_dict(state)}
        if name in EARLY:
            saved = torch.load(os.path.join(folder, f"{name}-early{rank}.pt"), weights_only=True)
            counting = _Counting(comm.mean)
            avg = REGISTRY[name].make(Comm(counting, comm.hierarchy))
            state = avgfn.load_state_dict(avg.init(saved["params"]), saved["state"])
            history, _, _ = train(avg, make_step(avg), saved["params"], state, xs, ys, range(EARLY[name], STEPS))
            out["registry"][name]["early"] = {"history": history, "value_checks": counting.value_checks}
    for name, path_type in ADAPTERS.items():
        checkpoint = torch.load(os.path.join(folder, f"{name}{rank}.pt"), weights_only=True)
        out["adapters"][name] = _run_adapter(path_type(checkpoint), rank, range(MODULE_CHECKPOINT, MODULE_STEPS))
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], list[Any]]:
    folder = str(tmp_path_factory.mktemp("resume-registry"))
    first = run_world(_first_world, WORLD, folder, timeout=240)
    second = run_world(_second_world, WORLD, folder, timeout=240)
    return first, second


# --- the checks -------------------------------------------------------------------------


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_every_averager_resumes_mid_period_in_fresh_processes_bit_for_bit(worlds, name):
    first, second = worlds
    at = [first[r]["registry"][name]["at_checkpoint"] for r in range(WORLD)]
    assert any(not torch.equal(at[0][k], at[1][k]) for k in FLOAT_KEYS), f"{name}: not mid-period"
    for rank in range(WORLD):
        full = first[rank]["registry"][name]["history"][CHECKPOINT:]
        resumed = second[rank]["registry"][name]["history"]
        assert len(full) == len(resumed) == STEPS - CHECKPOINT
        for offset, (want, got) in enumerate(zip(full, resumed)):
            for key in want:
                assert _equal(got[key], want[key]), (name, rank, CHECKPOINT + offset, key)
        want_state = first[rank]["registry"][name]["state"]
        got_state = second[rank]["registry"][name]["state"]
        assert got_state.keys() == want_state.keys()
        for key in want_state:
            assert _equal(got_state[key], want_state[key]), (name, rank, key)


@pytest.mark.parametrize("name", sorted(EARLY))
def test_a_resume_before_the_first_round_compares_the_loaded_global_copies(worlds, name):
    first, second = worlds
    at = [first[r]["registry"][name]["early_params"] for r in range(WORLD)]
    assert any(not torch.equal(at[0][k], at[1][k]) for k in FLOAT_KEYS), f"{name}: the params agree"
    for rank in range(WORLD):
        assert all(not bool(r.any()) for r in first[rank]["registry"][name]["early_rounds"]), name
        resumed = second[rank]["registry"][name]["early"]
        # the params loaded differ between the ranks; the global copies agree
        assert resumed["value_checks"] == 1, (name, rank, resumed["value_checks"])
        full = first[rank]["registry"][name]["history"][EARLY[name]:]
        assert len(full) == len(resumed["history"])
        for offset, (want, got) in enumerate(zip(full, resumed["history"])):
            for key in want:
                assert _equal(got[key], want[key]), (name, rank, EARLY[name] + offset, key)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_the_adapters_resume_diloco_after_loading_the_weights_first(worlds, name):
    first, second = worlds
    assert not torch.equal(first[0]["adapters"][name]["at_checkpoint"], first[1]["adapters"][name]["at_checkpoint"])
    for rank in range(WORLD):
        full = first[rank]["adapters"][name]["history"][MODULE_CHECKPOINT:]
        resumed = second[rank]["adapters"][name]
        assert len(full) == len(resumed) == MODULE_STEPS - MODULE_CHECKPOINT
        for offset, (want, got) in enumerate(zip(full, resumed)):
            assert _equal(got, want), (name, rank, MODULE_CHECKPOINT + offset)
    # the rounds after the restart did average: the ranks agree at the outer round's step
    last_round = (MODULE_STEPS // MODULE_PERIOD) * MODULE_PERIOD - 1 - MODULE_CHECKPOINT
    assert torch.equal(second[0]["adapters"][name][last_round], second[1]["adapters"][name][last_round])


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_start_from_different_params_is_refused_before_anything_is_mixed(worlds, name):
    first, _ = worlds
    for rank in range(WORLD):
        r = first[rank]["fresh"][name]
        if name not in VALUES_CHECKED:  # verify="structure": different starting values are allowed
            assert r["error"] is None, (name, r)
            continue
        assert r["error"] == "ReplicaMismatchError", (name, rank, r)
        assert r["unchanged"] and r["buffers"] == 0, (name, rank, r)
        assert r["step"] is not None and r["message"].startswith(f"at step {r['step']}: ")
        assert "different global params at the first round" in r["message"], r["message"]
    assert first[0]["fresh"][name]["step"] == first[1]["fresh"][name]["step"]
    assert all(first[r]["after"] == 0.5 for r in range(WORLD))
