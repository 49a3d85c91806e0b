"""Exact resume: restart in fresh processes mid-period, continue as if never stopped.

The uninterrupted runs are those of ``test_post_local_oracle.py`` (its world
saved each rank's checkpoint in the middle of an averaging period with
``torch.save``). Here a fresh 4-process world builds everything anew, loads
the checkpoints with ``torch.load(weights_only=True)``, and runs to the end:
every parameter at every remaining step must equal the uninterrupted run's.
Every other averager, and the adapters around ``diloco``, are resumed the same
way in ``test_resume_registry.py``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_world  # noqa: E402
from test_post_local_oracle import (  # noqa: E402
    HIERARCHICAL_CHECKPOINT,
    PERIOD,
    PERIODIC_CHECKPOINT,
    START,
    STEPS,
    FunctionalPath,
    ModulePath,
    adamw,
    assert_same_every_step,
    hierarchical_algo,
    oracle_run,
    periodic_algo,
    reduces,
    sgd_momentum,
)


def resume_world(rank: int, world_size: int, folder: str):
    _, world_mean, pair_mean = reduces()
    out = {}

    checkpoint = torch.load(os.path.join(folder, f"periodic{rank}.pt"), weights_only=True)
    algo = periodic_algo(world_mean, pair_mean)
    module = ModulePath(algo, sgd_momentum, checkpoint=checkpoint["module"])
    functional = FunctionalPath(algo, checkpoint=checkpoint["functional"])
    out["resumed_at"] = module.opt.iteration
    runs = {"module": [], "functional": []}
    for step in range(PERIODIC_CHECKPOINT, STEPS):
        module.step(rank, step)
        functional.step(rank, step)
        runs["module"].append(module.params())
        runs["functional"].append(functional.flat_params())
    out["periodic"] = runs

    checkpoint = torch.load(os.path.join(folder, f"hierarchical{rank}.pt"), weights_only=True)
    module = ModulePath(hierarchical_algo(world_mean), adamw, checkpoint=checkpoint)
    runs = {"module": []}
    for step in range(HIERARCHICAL_CHECKPOINT, STEPS):
        module.step(rank, step)
        runs["module"].append(module.params())
    out["hierarchical"] = runs
    return out


def test_resume_mid_period_equals_uninterrupted_run():
    assert (PERIODIC_CHECKPOINT - START) % PERIOD not in (0, 1)  # truly mid-period
    folder, uninterrupted = oracle_run()
    resumed = run_world(resume_world, 4, folder)
    assert all(r["resumed_at"] == PERIODIC_CHECKPOINT for r in resumed)
    for scenario, start, paths in (
        ("periodic", PERIODIC_CHECKPOINT, ("module", "functional")),
        ("hierarchical", HIERARCHICAL_CHECKPOINT, ("module",)),
    ):
        for path in paths:
            assert_same_every_step(
                [r[scenario][path][start:] for r in uninterrupted],
                [r[scenario][path] for r in resumed],
                f"resumed {scenario} {path} run vs uninterrupted",
                first_step=start,
            )
