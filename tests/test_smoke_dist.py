import torch
import torch.distributed as dist

import avgfn
from _dist import run_world


def _mean_of_ranks(rank, world_size):
    params = {"w": torch.full((3,), float(rank)), "n": 5}
    return avgfn.average(params, avgfn.collectives.all_reduce_mean())


def test_all_reduce_mean_two_ranks():
    results = run_world(_mean_of_ranks, 2)
    for r in results:
        assert torch.equal(r["w"], torch.full((3,), 0.5))
        assert r["n"] == 5
