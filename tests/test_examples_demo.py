"""examples/local_sgd_gloo.py, run for real: two processes under torchrun on gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "local_sgd_gloo.py"

AVERAGED = re.compile(
    r"^\[rank (\d)\] step +(\d+)  loss [0-9.]+  averaged params \(round (\d+)\): "
    r"digest ([0-9a-f]{8}) -> ([0-9a-f]{8})$"
)
WARMUP = re.compile(r"^\[rank (\d)\] step +(\d+)  loss [0-9.]+  warm-up: gradients averaged$")
FINAL = re.compile(r"^\[rank (\d)\] final +loss [0-9.]+  digest ([0-9a-f]{8})$")


def _torchrun(*args: str) -> list[str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        str(SCRIPT), *args,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def test_demo_averages_and_ends_with_identical_params():
    # warm-up 2, period 3: params averaged at steps 2, 5 and 8, the last step.
    lines = _torchrun("--steps", "9", "--period", "3", "--warmup", "2")

    averaged: dict[tuple[int, int], tuple[int, str, str]] = {}
    warmup, final, summary = [], {}, []
    for line in lines:
        if m := AVERAGED.match(line):
            rank, step, rounds = int(m[1]), int(m[2]), int(m[3])
            averaged[(rank, step)] = (rounds, m[4], m[5])
        elif m := WARMUP.match(line):
            warmup.append((int(m[1]), int(m[2])))
        elif m := FINAL.match(line):
            final[int(m[1])] = m[2]
        elif line.startswith("rank 0 summary:"):
            summary.append(line)

    # The schedule is avgfn.periodic's: (step - warmup) % period == 0 from the warm-up on.
    assert sorted(averaged) == [(r, s) for r in (0, 1) for s in (2, 5, 8)], lines
    assert sorted(warmup) == [(0, 0), (1, 0)], lines
    for rank in (0, 1):
        assert [averaged[(rank, s)][0] for s in (2, 5, 8)] == [1, 2, 3]
    for step in (2, 5, 8):
        _, before0, after0 = averaged[(0, step)]
        _, before1, after1 = averaged[(1, step)]
        # Each rank took a local step on its own data: the replicas differ before...
        assert before0 != before1, (step, lines)
        # ...and hold bitwise the same params after the averaging.
        assert after0 == after1, (step, lines)
    assert len({averaged[(0, s)][2] for s in (2, 5, 8)}) == 3  # training moves the params
    # The last step was an averaging step: both ranks finish with those params.
    assert final == {0: averaged[(0, 8)][2], 1: averaged[(1, 8)][2]}, lines
    assert len(summary) == 1 and "3 param averagings in 7 local steps" in summary[0], lines

