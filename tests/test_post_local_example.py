"""examples/post_local_sgd.py, run for real: four processes under torchrun on gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "post_local_sgd.py"
LINE = re.compile(r"^\[rank (\d)\] step +(\d+)  loss [0-9.]+  digest ([0-9a-f]{8})  gradients: (\w+)(.*)$")
FINAL = re.compile(r"^\[rank (\d)\] final digest ([0-9a-f]{8})$")


def test_example_runs_post_local_sgd_on_four_ranks():
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        str(SCRIPT), "--steps", "10", "--start-step", "3", "--period", "3",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout}\n{done.stderr}"

    digests: dict[tuple[int, int], str] = {}
    notes: dict[tuple[int, int], str] = {}
    final = {}
    for line in done.stdout.splitlines():
        if m := LINE.match(line):
            key = (int(m[1]), int(m[2]))
            digests[key] = m[3]
            notes[key] = m[4] + m[5]
        elif m := FINAL.match(line):
            final[int(m[1])] = m[2]
    assert sorted(digests) == [(r, s) for r in range(4) for s in range(10)], done.stdout
    for step in range(10):
        d = [digests[(r, step)] for r in range(4)]
        # Nodes {0, 1} and {2, 3} average their gradients: equal within a node always.
        assert d[0] == d[1] and d[2] == d[3], (step, done.stdout)
        averaged = step >= 3 and (step - 3) % 3 == 0
        expected = "global" if step < 3 else "node, params averaged" if averaged else "node"
        assert all(notes[(r, step)].startswith(expected) for r in range(4)), (step, done.stdout)
        # Global gradients or a param averaging: equal everywhere; otherwise nodes differ.
        assert (d[0] == d[2]) == (step < 3 or averaged), (step, done.stdout)
    assert final == {r: digests[(0, 9)] for r in range(4)}
