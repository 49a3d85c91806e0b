"""Post-local SGD on real gloo, 4 processes, against torch's own implementation.

One 4-process world runs, side by side on identical models and data:

* periodic: torch's DDP + ``post_localSGD_hook`` + ``PostLocalSGDOptimizer(SGD,
  PeriodicModelAverager)`` against DDP + ``avgfn.collectives.ddp_comm_hook`` +
  ``avgfn.AveragingOptimizer(SGD, ModuleAverager)`` built from one
  ``avgfn.post_local_sgd`` (local gradient averaging over subgroups of 2);
* hierarchical: the same with AdamW, ``HierarchicalModelAverager`` and no
  gradient averaging after the switch (``post_local_gradient_allreduce=False``);
* functional: ``torch.func.grad`` + the gradient schedule +
  ``avgfn.with_averaging(avgfn.optim.sgd, averager)`` against the nn.Module
  path of the periodic scenario.

Each compares every parameter at every one of 32 steps, bit for bit, across
the switch at step 6. The world also saves checkpoints in the middle of an
averaging period, from which ``test_resume.py`` resumes in a fresh world.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_world  # noqa: E402

START = 6  # the switch step: torch's start_localSGD_iter and warmup_steps
PERIOD = 4
STEPS = 32
LR = 0.05
LEVELS = OrderedDict([(2, 2), (4, 4)])  # period -> group size, for the hierarchical scenario
# Checkpoints are taken after this many steps, in the middle of an averaging
# period: periodic averagings happen at 6, 10, 14, 18, ...; hierarchical ones at
# every even step.
PERIODIC_CHECKPOINT = 16
HIERARCHICAL_CHECKPOINT = 17


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def module_step(ddp: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    opt.zero_grad()
    x, y = batch(rank, step)
    nn.functional.mse_loss(ddp(x), y).backward()
    opt.step()


def reduces():
    """The Reduces both scenarios use (every rank calls this in the same order)."""
    import avgfn

    subgroup, _ = dist.new_subgroups(2)
    return subgroup, avgfn.collectives.all_reduce_mean(), avgfn.collectives.all_reduce_mean(subgroup)


class ModulePath:
    """DDP + avgfn's hook + AveragingOptimizer(ModuleAverager) on one model copy."""

    def __init__(self, algo, make_optimizer, checkpoint=None):
        import avgfn
        from avgfn import AveragingOptimizer
        from avgfn import ModuleAverager

        self.model = make_model()
        # DDP broadcasts rank 0's weights when it is built: per-rank weights
        # from a checkpoint are loaded after it.
        self.ddp = nn.parallel.DistributedDataParallel(self.model)
        self.opt = AveragingOptimizer(
            make_optimizer(self.ddp.parameters()), ModuleAverager(self.model, algo.averager)
        )
        hook_state, hook = avgfn.collectives.ddp_comm_hook(
            algo.gradients, step=lambda: self.opt.iteration
        )
        self.ddp.register_comm_hook(hook_state, hook)
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.opt.load_state_dict(checkpoint["optimizer"])

    def step(self, rank, step):
        assert self.opt.iteration == step
        module_step(self.ddp, self.opt, rank, step)

    def params(self):
        return flat(self.model)

    def checkpoint(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}


def functional_loss(params, x, y, model):
    return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)


class FunctionalPath:
    """torch.func.grad + gradient schedule + with_averaging(avgfn.optim.sgd, averager)."""

    def __init__(self, algo, checkpoint=None):
        import avgfn
        from avgfn import with_averaging
        from avgfn.optim import sgd

        self.template = make_model()
        self.algo = algo
        self.params = {n: p.detach().clone() for n, p in self.template.named_parameters()}
        self.names = list(self.params)
        self.train = with_averaging(sgd(LR, momentum=0.9), algo.averager)
        self.state = self.train.init(self.params)
        self.g_state = algo.gradients.init(self.params)
        self.grad_fn = torch.func.grad(functional_loss)
        if checkpoint is not None:
            self.params = checkpoint["params"]
            self.state = avgfn.load_state_dict(self.state, checkpoint["state"])
            self.g_state = avgfn.load_state_dict(self.g_state, checkpoint["gradients"])

    def step(self, rank, step):
        x, y = batch(rank, step)
        grads = self.grad_fn(self.params, x, y, self.template)
        # Lay the gradients out as DDP lays out its one bucket: parameter order
        # on the first iteration, gradient-ready order (here the reverse) once
        # it has rebuilt its buckets. gloo's ring all-reduce adds the 4 ranks'
        # values in an order that depends on an element's offset, so only the
        # same layout gives the same bits (any layout gives the same mean up to
        # rounding).
        order = self.names if step == 0 else self.names[::-1]
        laid_out, self.g_state = self.algo.gradients.update(
            {n: grads[n] for n in order}, self.g_state, step
        )
        grads = {n: laid_out[n] for n in self.names}
        self.params, self.state = self.train.update(grads, self.state, self.params, step)

    def flat_params(self):
        return torch.cat([p.reshape(-1) for p in self.params.values()])

    def checkpoint(self):
        import avgfn

        return {
            "params": self.params,
            "state": avgfn.state_dict(self.state),
            "gradients": avgfn.state_dict(self.g_state),
        }


def periodic_algo(world_mean, pair_mean):
    from avgfn import post_local_sgd

    return post_local_sgd(START, global_reduce=world_mean, local_reduce=pair_mean, period=PERIOD)


def hierarchical_algo(world_mean):
    import avgfn
    from avgfn import post_local_sgd

    levels = avgfn.collectives.hierarchy(LEVELS)
    return post_local_sgd(START, global_reduce=world_mean, local_reduce=None, levels=levels)


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def adamw(params):
    return torch.optim.AdamW(params, lr=LR)


def oracle_world(rank: int, world_size: int, folder: str):
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState,
        post_localSGD_hook,
    )
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager,
    )
    from torch.distributed.optim import PostLocalSGDOptimizer

    out = {}
    subgroup, world_mean, pair_mean = reduces()

    # --- periodic, SGD with momentum, local gradient averaging over pairs -----------
    model_t = make_model()
    ddp_t = nn.parallel.DistributedDataParallel(model_t)
    ddp_t.register_comm_hook(PostLocalSGDState(None, subgroup, START), post_localSGD_hook)
    opt_t = PostLocalSGDOptimizer(
        sgd_momentum(ddp_t.parameters()), PeriodicModelAverager(PERIOD, warmup_steps=START)
    )
    algo = periodic_algo(world_mean, pair_mean)
    ours = ModulePath(algo, sgd_momentum)
    functional = FunctionalPath(algo)
    runs = {"torch": [], "module": [], "functional": []}
    for step in range(STEPS):
        module_step(ddp_t, opt_t, rank, step)
        ours.step(rank, step)
        functional.step(rank, step)
        runs["torch"].append(flat(model_t))
        runs["module"].append(ours.params())
        runs["functional"].append(functional.flat_params())
        if step + 1 == PERIODIC_CHECKPOINT:
            checkpoint = {"module": ours.checkpoint(), "functional": functional.checkpoint()}
            torch.save(checkpoint, os.path.join(folder, f"periodic{rank}.pt"))
    out["periodic"] = runs
    out["periodic_counters"] = (
        opt_t.averager.step,
        ours.opt.iteration,
        int(ours.opt.averager.state.rounds),
    )

    # --- hierarchical, AdamW, no gradient averaging after the switch ----------------
    model_t = make_model()
    ddp_t = nn.parallel.DistributedDataParallel(model_t)
    ddp_t.register_comm_hook(
        PostLocalSGDState(None, subgroup, START, post_local_gradient_allreduce=False),
        post_localSGD_hook,
    )
    opt_t = PostLocalSGDOptimizer(
        adamw(ddp_t.parameters()), HierarchicalModelAverager(LEVELS, warmup_steps=START)
    )
    ours = ModulePath(hierarchical_algo(world_mean), adamw)
    runs = {"torch": [], "module": []}
    for step in range(STEPS):
        module_step(ddp_t, opt_t, rank, step)
        ours.step(rank, step)
        runs["torch"].append(flat(model_t))
        runs["module"].append(ours.params())
        if step + 1 == HIERARCHICAL_CHECKPOINT:
            torch.save(ours.checkpoint(), os.path.join(folder, f"hierarchical{rank}.pt"))
    out["hierarchical"] = runs
    out["hierarchical_rounds"] = ours.opt.averager.state.rounds.tolist()
    return out


@functools.lru_cache(maxsize=None)
def oracle_run():
    """Run the oracle world once per test session: ``(checkpoint folder, results)``."""
    folder = tempfile.mkdtemp(prefix="avgfn-plsgd-")
    return folder, run_world(oracle_world, 4, folder)


def assert_same_every_step(a_runs, b_runs, what, first_step=0):
    for rank, (a_steps, b_steps) in enumerate(zip(a_runs, b_runs)):
        assert len(a_steps) == len(b_steps) == STEPS - first_step
        for i, (a, b) in enumerate(zip(a_steps, b_steps)):
            assert torch.equal(a, b), (
                f"{what}: rank {rank} differs at step {first_step + i}, max |diff| "
                f"{(a - b).abs().max().item():.3g}"
            )


def test_periodic_matches_torch_every_step():
    _, results = oracle_run()
    torch_runs = [r["periodic"]["torch"] for r in results]
    avgfn_runs = [r["periodic"]["module"] for r in results]
    assert_same_every_step(
        torch_runs, avgfn_runs, "DDP+avgfn vs DDP+post_localSGD_hook+PostLocalSGDOptimizer"
    )
    # Both phases are exercised: ranks agree during the warm-up and right after
    # each averaging; in between, the two pairs differ (and each pair agrees,
    # thanks to the local gradient averaging).
    for step in range(STEPS):
        values = [run[step] for run in avgfn_runs]
        assert torch.equal(values[0], values[1]) and torch.equal(values[2], values[3])
        averaged = step < START or (step - START) % PERIOD == 0
        assert torch.equal(values[0], values[2]) == averaged, step
    for r in results:
        torch_counter, avgfn_iteration, rounds = r["periodic_counters"]
        assert torch_counter == avgfn_iteration == STEPS
        assert rounds == len(range(START, STEPS, PERIOD))


def test_hierarchical_matches_torch_every_step():
    _, results = oracle_run()
    torch_runs = [r["hierarchical"]["torch"] for r in results]
    avgfn_runs = [r["hierarchical"]["module"] for r in results]
    assert_same_every_step(torch_runs, avgfn_runs, "DDP+avgfn vs HierarchicalModelAverager")
    for step in range(STEPS):
        values = [run[step] for run in avgfn_runs]
        pairs_agree = torch.equal(values[0], values[1]) and torch.equal(values[2], values[3])
        all_agree = pairs_agree and torch.equal(values[0], values[2])
        if step < START or step % 4 == 0:
            assert all_agree, step
        elif step % 2 == 0:
            assert pairs_agree and not all_agree, step
        else:  # no gradient averaging in the local phase: every rank drifts
            assert not torch.equal(values[0], values[1]), step
    # Rounds per level: even steps >= 6 not divisible by 4 (6, 10, ..., 30),
    # and steps >= 6 divisible by 4 (8, ..., 28).
    assert results[0]["hierarchical_rounds"] == [7, 6]


def test_functional_loop_matches_module_path():
    _, results = oracle_run()
    module_runs = [r["periodic"]["module"] for r in results]
    functional_runs = [r["periodic"]["functional"] for r in results]
    assert_same_every_step(
        module_runs, functional_runs, "torch.func + avgfn.optim vs nn.Module path"
    )
