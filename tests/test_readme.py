"""The code in README.md and in the docs pages runs, so the pages cannot rot.

Conventions of the markdown files checked here:

* a ```python block is run. The blocks of one file run in order, in one
  namespace (a page reads as one program), in a scratch working directory;
* a ```pycon block is a doctest (``>>>`` lines and their output), run in that
  same namespace, so its printed values are checked too;
* a ```py block is a fragment (it needs names or processes the page does not
  set up): it is only compiled.

The README's runnable block is run in this process (as ``python train.py``
would run it) and as a script on two processes under torchrun.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The pages whose code blocks are kept runnable under these conventions.
DOC_PAGES = [
    "index.md",
    "quickstart.md",
    "average.md",
    "periodic.md",
    "hierarchical.md",
    "collectives.md",
    "checkpoints.md",
    "testing.md",
    "migration.md",
    "post_local_sgd.md",
    "optim.md",
    "modules.md",
    "simulate.md",
    "diloco.md",
    "streaming_diloco.md",
    "slowmo.md",
    "weighted.md",
    "temporal.md",
    "demo.md",
    "failures.md",
]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` for each fenced block of a markdown file."""
    text = path.read_text(encoding="utf-8")
    return [
        (m[1], m[2], text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)
    ]


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # Buffered output: each rank writes its lines at exit, so two ranks' lines do not mix.
    env.pop("PYTHONUNBUFFERED", None)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore:Failed to initialize NumPy"
    return env


def _readme_script() -> str:
    runnable = [code for lang, code, _ in blocks(README) if lang == "python"]
    assert len(runnable) == 1, "README.md should hold exactly one runnable ```python block"
    return runnable[0]


def run_page(path: Path) -> int:
    """Run the blocks of one markdown file; return how many were run."""
    namespace: dict = {"__name__": "__docs__"}
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    ran = 0
    for lang, code, line in blocks(path):
        where = f"{path.name}:{line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - our own docs
            ran += 1
        elif lang == "pycon":
            test = parser.get_doctest(code, namespace, where, str(path), line - 1)
            report: list[str] = []
            result = runner.run(test, out=report.append, clear_globs=False)
            assert result.failed == 0, f"the doctest at {where} failed:\n" + "".join(report)
            namespace.update(test.globs)  # DocTest works on a copy of the namespace
            ran += 1
        elif lang == "py":
            compile(code, where, "exec")
    return ran


def test_readme_gives_the_two_commands():
    text = README.read_text(encoding="utf-8")
    shell = [code for lang, code, _ in blocks(README) if lang == "sh"]
    commands = [line.split("#")[0].strip() for code in shell for line in code.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
    assert "make docs" not in text
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"the Makefile has no {target} target"


def test_readme_fragments_compile():
    fragments = [(code, line) for lang, code, line in blocks(README) if lang == "py"]
    assert len(fragments) >= 2  # the PeriodicModelAverager -> avgfn side by side
    for code, line in fragments:
        compile(code, f"README.md:{line}", "exec")


def test_readme_example_runs_in_one_process(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_script(), "README.md", "exec"), {"__name__": "__main__"})  # noqa: S102
    assert not dist.is_initialized()
    # A group of one averages at 0, 4, ..., 36, and the model learns the task.
    m = re.fullmatch(r"10 averagings, last batch loss ([0-9.]+)\n", capsys.readouterr().out)
    assert m, "unexpected output"
    assert float(m[1]) < 0.5


def test_readme_example_runs_under_torchrun(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_readme_script(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node", "2", str(script)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = re.findall(r"10 averagings, last batch loss [0-9]\.[0-9]{3}", done.stdout)
    assert len(lines) == 2, done.stdout


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_page_runs(page, tmp_path, monkeypatch):
    path = ROOT / "docs" / page
    monkeypatch.chdir(tmp_path)
    try:
        run_page(path)
    finally:
        # A page that starts a process group of one must close it; make sure.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            pytest.fail(f"docs/{page} left a process group initialized")


# Pages that other parts of the project add; a link to one is checked once it exists.
LATER_PAGES: set[str] = set()


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p}" for p in DOC_PAGES)])
def test_relative_links_resolve(page):
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue  # an absolute address
        resolved = (path.parent / target).resolve()
        if resolved.name in LATER_PAGES and not resolved.exists():
            continue
        assert resolved.exists(), f"{page} links to {target}, which does not exist"
