"""Every averager on CUDA tensors: over NCCL (a world of one) and simulated under ``vmap``.

These run only where CUDA is present (they are skipped, with the reason,
elsewhere). Each registered averager of tests/test_conformance.py trains the
conformance task on CUDA params and must:

* keep every tensor of its state on the params' device (its buffers too:
  the results are CUDA tensors);
* give the CPU run's params up to float rounding (a world of one over NCCL
  against the CPU run with ``lambda t: t``; the vmapped simulation of 4
  replicas on the GPU against the same simulation on the CPU).

benchmarks/gpu.py is run too: on a GPU with small sizes, elsewhere it must
say there is no GPU and exit cleanly.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch.func import vmap

import test_conformance as tc
from avgfn import collectives, simulate

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this machine has none)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GPU_RTOL, ON_GPU_ATOL = 1e-4, 1e-5  # kernels of other summation orders and fused multiply-adds


def _to(tree: Any, device: str) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def _eager(name: str, comm: tc.Comm, device: str) -> tuple[list, Any]:
    avg = tc.REGISTRY[name].make(comm)
    params = _to(tc.initial_params(0), device)
    xs, ys = _to(tc.data(0), device)
    history, _, state = tc.train(avg, tc.make_step(avg), params, avg.init(params), xs, ys)
    return history, state


def _on(device: str, tree: Any) -> bool:
    return all(t.device.type == device for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def _close(got: list, want: list, name: str) -> None:
    for step, (a, b) in enumerate(zip(got, want)):
        for key in tc.FLOAT_KEYS:
            torch.testing.assert_close(
                a[key].cpu(), b[key], rtol=ON_GPU_RTOL, atol=ON_GPU_ATOL, msg=lambda m: f"{name} {step} {key}: {m}"
            )


@pytest.fixture(scope="module")
def nccl_world_of_one():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as folder:
        torch.cuda.set_device(0)
        dist.init_process_group(
            "nccl", init_method=f"file://{os.path.join(folder, 'store')}", rank=0, world_size=1,
            timeout=datetime.timedelta(seconds=120),
        )  # fmt: skip
        try:
            yield collectives.all_reduce_mean()
        finally:
            dist.destroy_process_group()


@needs_cuda
@pytest.mark.parametrize("name", tc.NAMES)
def test_every_averager_over_nccl_with_a_world_of_one(nccl_world_of_one, name):
    mean = nccl_world_of_one
    comm = tc.Comm(mean, lambda spec: [(period, mean) for period in spec], 1)
    history, state = _eager(name, comm, "cuda")
    want, _ = _eager(name, tc.ALONE, "cpu")
    assert _on("cuda", history[-1]) and _on("cuda", state), f"{name}: a tensor left the GPU"
    _close(history, want, name)


@needs_cuda
@pytest.mark.parametrize("name", tc.NAMES)
def test_every_averager_simulated_under_vmap_on_the_gpu(name):
    def run(device: str) -> tuple[list, Any]:
        comm = tc.Comm(simulate.replica_mean(), lambda spec: simulate.hierarchy(spec, tc.WORLD), tc.WORLD)
        avg = tc.REGISTRY[name].make(comm)
        stacked = _to(simulate.stack([tc.initial_params(r) for r in range(tc.WORLD)]), device)
        xs = torch.stack([tc.data(r)[0] for r in range(tc.WORLD)], dim=1).to(device)
        ys = torch.stack([tc.data(r)[1] for r in range(tc.WORLD)], dim=1).to(device)
        step_fn = vmap(tc.make_step(avg), in_dims=(0, 0, 0, 0, None))
        history, _, state = tc.train(avg, step_fn, stacked, vmap(avg.init)(stacked), xs, ys)
        return history, state

    history, state = run("cuda")
    want, _ = run("cpu")
    assert _on("cuda", history[-1]) and _on("cuda", state), f"{name}: a tensor left the GPU"
    _close(history, want, name)


def test_the_gpu_benchmark_runs_or_says_there_is_no_gpu():
    small = [] if not torch.cuda.is_available() else ["--replicas", "8", "--steps", "1", "--repeat", "2"]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), *small],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    if torch.cuda.is_available():
        assert "replica-steps/s" in done.stdout and "bare NCCL all-reduce" in done.stdout, done.stdout
    else:
        assert "no CUDA device" in done.stdout, done.stdout
