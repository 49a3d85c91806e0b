"""The torch-shaped adapters give a torch user torch's semantics.

* ``AveragingOptimizer`` and ``ModuleAverager`` average, by default, only the
  parameters that have a gradient, as torch's ``PostLocalSGDOptimizer`` and
  model averagers do: on 3 gloo processes, torch's own
  ``test_post_localSGD_optimizer_parity`` model (a ``Linear`` with a frozen
  bias, an integer parameter) trained as ``docs/modules.md`` says is bit-equal
  to torch's ``PostLocalSGDOptimizer`` at every step; ``params="all"`` keeps
  the old behaviour; ranks that differ in which params have a gradient all
  raise before anything is mixed.
* ``ddp_comm_hook``'s own counter stops at the switch step, as torch's
  ``PostLocalSGDState.iter`` does: side by side with torch's hook on DDP.
* A retry of ``AveragingOptimizer.step()`` after a failed averaging (a
  ``PeerError``) re-attempts only the averaging: the inner step is applied
  once, and the run ends where a run without the failure ends.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import avgfn
from avgfn import testing

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_world  # noqa: E402

WORLD = 3
LR = 0.03
START = 3  # the hook scenario's start_localSGD_iter
HOOK_STEPS = 8


class _FC2(nn.Module):
    """torch's test model's middle layer: a Linear whose bias is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 50, bias=True)
        self.fc.bias.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Net(nn.Module):
    """The model of torch's ``test_post_localSGD_optimizer_parity`` (distributed_test.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 10, bias=False)
        self.fc2 = _FC2()
        self.fc3 = nn.Linear(50, 4, bias=False)
        self.relu = nn.ReLU()
        self.no_grad_param = nn.Parameter(torch.tensor([2, 2]).long(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return nn.functional.softmax(self.fc3(x), dim=1)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2 * WORLD, 2, generator=g), torch.randn(2 * WORLD, 4, generator=g)


def _train_step(opt: Any, net: nn.Module, rank: int, step: int) -> None:
    opt.zero_grad()
    x, y = _batch(rank, step)
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def _differences(a: nn.Module, b: nn.Module) -> dict[str, int]:
    """Per parameter, how many elements differ in their bits (only the ones that do)."""
    out = {}
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        n = int((p.detach() != q.detach()).sum())
        if n:
            out[name] = n
    return out


def _parity(rank: int, period: int, warmup: int, steps: int, params: Any, ddp: bool = True) -> dict[str, Any]:
    """torch's PostLocalSGDOptimizer against AveragingOptimizer, as docs/modules.md builds it.

    With ``ddp=False`` each rank trains on its own (local SGD without any
    gradient averaging), so the replicas differ when they are averaged.
    """
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module) if ddp else module

    base = _net()
    torch_net = wrap(copy.deepcopy(base))
    torch_opt = PostLocalSGDOptimizer(
        optim=torch.optim.SGD(torch_net.parameters(), lr=LR),
        averager=PeriodicModelAverager(period=period, warmup_steps=warmup),
    )
    model = copy.deepcopy(base)
    ours_net = wrap(model)
    extra = {} if params is None else {"params": params}
    averager = avgfn.periodic(period, reduce=avgfn.collectives.all_reduce_mean(), warmup_steps=warmup)
    opt = avgfn.AveragingOptimizer(
        torch.optim.SGD(ours_net.parameters(), lr=LR), avgfn.ModuleAverager(model, averager, **extra)
    )
    per_step = []
    for step in range(steps):
        _train_step(torch_opt, torch_net, rank, step)
        _train_step(opt, ours_net, rank, step)
        per_step.append(_differences(torch_net.module if ddp else torch_net, model))
    bias_moved = not torch.equal(model.fc2.fc.bias, base.fc2.fc.bias)
    return {
        "differences": per_step,
        "counters": (torch_opt.averager.step, opt.iteration),
        "rounds": int(opt.averager.state.rounds),
        "frozen_bias_moved": bias_moved,
    }


def _mismatch(rank: int) -> dict[str, Any]:
    """Rank 1 used a layer the others did not: under torch's filter, every rank must refuse."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 1)})
    avg = avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=avgfn.collectives.all_reduce_mean(timeout=30)))
    model["a"](torch.ones(1, 2)).sum().backward()
    if rank == 1:
        model["b"](torch.ones(1, 2)).sum().backward()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = avg.state
    try:
        avg.step(0)
        error, message = None, ""
    except Exception as e:  # noqa: BLE001 - compared by name in the test
        error, message = type(e).__name__, str(e)
    unchanged = all(torch.equal(before[k], v) for k, v in model.named_parameters())
    return {"error": error, "message": message, "unchanged": unchanged, "state_kept": avg.state is state}


def _hook(rank: int) -> dict[str, Any]:
    """torch's PostLocalSGDState + post_localSGD_hook against ddp_comm_hook without step=."""
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState,
        post_localSGD_hook,
    )
    from torch.nn.parallel import DistributedDataParallel

    subgroup, _ = dist.new_subgroups_by_enumeration([[0, 1], [2]])
    base = _net()
    # A small bucket cap: several buckets per backward pass, so only the last may count.
    torch_net = DistributedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.001)
    torch_state = PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=START)
    torch_net.register_comm_hook(torch_state, post_localSGD_hook)

    ours_net = DistributedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.001)
    algo = avgfn.post_local_sgd(
        START,
        global_reduce=avgfn.collectives.all_reduce_mean(),
        local_reduce=avgfn.collectives.all_reduce_mean(subgroup),
        period=2,
    )
    ours_state, hook = avgfn.collectives.ddp_comm_hook(algo.gradients)
    buckets = [0]

    def counting(state, bucket):  # noqa: ANN001, ANN202 - DDP checks annotations
        buckets[0] += 1
        return hook(state, bucket)

    ours_net.register_comm_hook(ours_state, counting)
    counters, grads_equal = [], []
    for step in range(HOOK_STEPS):
        x, y = _batch(rank, step)
        for net in (torch_net, ours_net):
            net.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
        counters.append((torch_state.iter, ours_state.iteration))
        grads_equal.append(
            all(
                (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
                for p, q in zip(torch_net.parameters(), ours_net.parameters())
            )
        )
    return {"counters": counters, "grads_equal": grads_equal, "buckets": buckets[0]}


def _world(rank: int, world_size: int) -> dict[str, Any]:
    scenarios = {
        # torch's own test: DDP, period 4, warm-up 10, 20 steps
        "torch_test": lambda: _parity(rank, 4, 10, 20, None),
        # averaging from the first step on, every 2 steps
        "from_start": lambda: _parity(rank, 2, 0, 8, None),
        # no DDP: the replicas drift apart between averagings
        "local": lambda: _parity(rank, 2, 1, 9, None, ddp=False),
        # the explicit opt-out: every floating-point param, the frozen bias included
        "all": lambda: _parity(rank, 2, 0, 1, "all"),
        "mismatch": lambda: _mismatch(rank),
        "hook": lambda: _hook(rank),
    }
    results: dict[str, Any] = {}
    for name, run in scenarios.items():
        try:
            results[name] = run()
        except Exception as e:  # noqa: BLE001 - reported by the test that reads it
            results[name] = {"crashed": f"{type(e).__name__}: {e}"}
        dist.barrier()
    return results


def _result(world: list[Any], rank: int, name: str) -> dict[str, Any]:
    r = world[rank][name]
    assert "crashed" not in r, f"rank {rank}, {name}: {r['crashed']}"
    return r


@pytest.fixture(scope="module")
def world():
    return run_world(_world, WORLD, timeout=400)


# --- 1. torch's filter by default -----------------------------------------------------


@pytest.mark.parametrize("scenario", ["torch_test", "from_start", "local"])
def test_default_is_bit_equal_to_torchs_post_local_sgd_optimizer(world, scenario):
    for rank in range(WORLD):
        r = _result(world, rank, scenario)
        bad = [(step, d) for step, d in enumerate(r["differences"]) if d]
        assert not bad, f"rank {rank}: (step, param -> differing elements): {bad[:3]}"
        torch_counter, ours = r["counters"]
        assert torch_counter == ours == len(r["differences"])
        assert not r["frozen_bias_moved"]
    assert world[0]["torch_test"]["rounds"] == 3  # steps 10, 14, 18
    assert world[0]["from_start"]["rounds"] == 4
    assert world[0]["local"]["rounds"] == 4  # steps 1, 3, 5, 7


def test_params_all_averages_the_frozen_bias_too(world):
    # Every float param goes to the Reduce: the mean of three equal biases,
    # each divided by 3 and summed, rounds differently from torch in some elements.
    for rank in range(WORLD):
        r = _result(world, rank, "all")
        assert r["differences"][0] == {"fc2.fc.bias": 8}, r["differences"]  # docs/modules.md says 8
        assert r["frozen_bias_moved"]


def test_ranks_whose_grads_differ_all_raise_and_nothing_is_written(world):
    for rank in range(WORLD):
        r = _result(world, rank, "mismatch")
        assert r["error"] == "ReplicaMismatchError", (rank, r)
        assert r["unchanged"] and r["state_kept"], rank
    assert "['b." in world[0]["mismatch"]["message"]


def _frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    return model


def _backward(model):
    g = torch.Generator().manual_seed(0)
    model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()


def test_what_goes_to_the_reduce_under_each_policy():
    sizes = {}
    for policy in ("with_grad", "all"):
        model = _frozen()
        _backward(model)
        reduce = testing.RecordingReduce(lambda t: t * 0)
        avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=reduce), params=policy).step(0)
        sizes[policy] = reduce.inputs[0].numel()
        assert torch.equal(model[0].bias, _frozen()[0].bias) is (policy == "with_grad")
    n = sum(p.numel() for p in _frozen().parameters())
    assert sizes == {"with_grad": n - 4, "all": n}
    # A plain Averager over the optimizer's param groups: the same filter.
    model = _frozen()
    _backward(model)
    reduce = testing.RecordingReduce(lambda t: t * 0)
    opt = avgfn.AveragingOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), avgfn.periodic(2, reduce=reduce))
    opt.step()
    assert reduce.inputs[0].numel() == n - 4
    model = _frozen()
    _backward(model)
    reduce = testing.RecordingReduce(lambda t: t * 0)
    opt = avgfn.AveragingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), avgfn.periodic(2, reduce=reduce), params="all"
    )
    opt.step()
    assert reduce.inputs[0].numel() == n


def test_a_step_before_any_backward_averages_nothing_and_buffers_follow_their_policy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    _ = net(torch.randn(8, 2))  # the running statistics move; no gradient anywhere
    weight, mean = net[0].weight.detach().clone(), net[1].running_mean.clone()
    reduce = testing.RecordingReduce(lambda t: t * 0)
    avg = avgfn.ModuleAverager(net, avgfn.periodic(2, reduce=reduce), buffers="average")
    with pytest.warns(UserWarning, match="no parameter has a gradient"):
        assert avg.step(0) is True
    assert torch.equal(net[0].weight, weight)            # no gradient: left out, as torch does
    assert torch.equal(net[1].running_mean, mean * 0)    # buffers are not params: averaged
    assert reduce.inputs[0].numel() == 4                 # running_mean and running_var


def test_diloco_keeps_its_global_copy_of_the_trainable_params():
    model = _frozen()
    avg = avgfn.ModuleAverager(model, avgfn.diloco(2, reduce=lambda t: t))
    assert len(avg.state.global_params) == 3             # the frozen bias has no global copy
    for step in range(4):
        model.zero_grad()
        _backward(model)
        avg.step(step)
    assert int(avg.state.rounds) == 2


def test_bad_params_policies_are_refused():
    model = _frozen()
    with pytest.raises(ValueError, match="params must be one of"):
        avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=lambda t: t), params="grad")
    with pytest.raises(ValueError, match="params must be one of"):
        avgfn.AveragingOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), avgfn.periodic(2, reduce=lambda t: t), params=True
        )
    with pytest.raises(ValueError, match="pass params= to the ModuleAverager"):
        avgfn.AveragingOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=lambda t: t)),
            params="all",
        )


# --- 2. the hook's counter stops where torch's does -----------------------------------


def test_hook_counter_matches_torchs_post_local_sgd_state(world):
    for rank in range(WORLD):
        r = _result(world, rank, "hook")
        assert r["counters"] == [(min(i + 1, START),) * 2 for i in range(HOOK_STEPS)], (rank, r["counters"])
        assert all(r["grads_equal"]), (rank, r["grads_equal"])
        assert r["buckets"] > HOOK_STEPS  # several buckets per backward pass


# --- 3. a retry after a failed averaging ----------------------------------------------


class _FailOnce:
    """A peer at zero (the mean halves every value) whose n-th call raises PeerError."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            tensor.fill_(float("nan"))  # a round that dies mid-way may leave anything behind
            raise avgfn.PeerError("fake: a peer died", group="a fake group of 2", timeout=1.0)
        return tensor / 2


def _retry_run(fail_at: int, scaler: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reduce = _FailOnce(fail_at)
    opt = avgfn.AveragingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=reduce, warmup_steps=1)),
    )
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0) if scaler else None
    failures = []
    for step in range(7):
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        loss = model(torch.randn(8, 3, generator=g)).pow(2).mean()
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()
        kwargs = {} if grad_scaler is None else {"scaler": grad_scaler}
        try:
            opt.step(**kwargs)
        except avgfn.PeerError:
            failures.append(opt.iteration)
            after_failure = [p.detach().clone() for p in model.parameters()]
            opt.step(**kwargs)  # the retry
            failures.append(after_failure)
        if grad_scaler is not None:
            grad_scaler.update()
    return model, opt, failures


@pytest.mark.parametrize("scaler", [False, True])
def test_a_retry_after_a_peer_error_applies_the_inner_step_once(scaler):
    clean_model, clean_opt, none = _retry_run(fail_at=0, scaler=scaler)
    model, opt, failures = _retry_run(fail_at=2, scaler=scaler)  # the averaging at step 3
    assert none == [] and failures[0] == 3
    assert all(torch.isfinite(p).all() for p in failures[1])  # nothing written by the failed round
    assert opt.iteration == clean_opt.iteration == 7
    assert int(opt.averager.state.rounds) == int(clean_opt.averager.state.rounds) == 3  # 1, 3, 5
    for p, q in zip(model.parameters(), clean_model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(opt.state_dict()["state"].values(), clean_opt.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_after_a_failure_the_params_hold_the_inner_step_and_a_checkpoint_is_refused():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = avgfn.AveragingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=_FailOnce(1)))
    )
    saved = opt.state_dict()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        m(torch.ones(2, 3)).sum().backward()
    ref_opt.step()
    state = opt.averager.state
    with pytest.raises(avgfn.PeerError):
        opt.step()
    assert opt.iteration == 0 and opt.averager.state is state
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)  # the inner step, and only it
    with pytest.raises(RuntimeError, match="retry"):
        opt.state_dict()
    opt.load_state_dict(saved)  # giving up: a checkpoint clears the pending averaging
    assert opt.iteration == 0
    opt.state_dict()


def _retry_after_zero_grad_run(fail_at: int, scaler: bool):
    """The loop a user writes around a flaky group: retry, zero_grad, scaler.update in a finally."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # a frozen param: left out by torch's filter
    opt = avgfn.AveragingOptimizer(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9),
        avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=_FailOnce(fail_at), warmup_steps=1)),
    )
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0) if scaler else None
    kwargs = {} if grad_scaler is None else {"scaler": grad_scaler}
    failures = 0
    for step in range(7):
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        loss = model(torch.randn(8, 3, generator=g)).pow(2).mean()
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()
        while True:
            try:
                opt.step(**kwargs)
                break
            except avgfn.PeerError:
                failures += 1
                opt.zero_grad()  # the gradients are gone before the retry
            finally:
                if grad_scaler is not None:
                    grad_scaler.update()
    return model, opt, failures


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad-scaler"])
def test_a_retry_after_zero_grad_still_averages_what_the_failed_step_selected(scaler):
    # before: the retry re-read .grad (all None after zero_grad), averaged nothing and counted
    # the round; with a scaler, the update() after the retry raised "No inf checks were recorded"
    clean_model, clean_opt, none = _retry_after_zero_grad_run(0, scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the retry does not warn about missing gradients
        model, opt, failures = _retry_after_zero_grad_run(2, scaler)
    assert none == 0 and failures == 1
    assert int(opt.averager.state.rounds) == int(clean_opt.averager.state.rounds) == 3
    for p, q in zip(model.parameters(), clean_model.parameters()):
        assert torch.equal(p, q)


def test_a_module_averager_stepped_after_zero_grad_warns_once():
    model = _frozen()
    reduce = testing.RecordingReduce(lambda t: t * 0)
    avg = avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=reduce))
    _backward(model)
    model.zero_grad()  # set_to_none: no parameter has a gradient any more
    with pytest.warns(UserWarning, match=r"no parameter has a gradient.*zero_grad\(\) called before step\(\)"):
        avg.step(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        avg.step(2)  # once per averager
        avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=reduce), params="all").step(0)
