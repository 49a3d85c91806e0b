"""Every example says how to run it, and what it says is true.

The run instructions of ``examples/*.py`` are the literal blocks (a paragraph
ending in ``::``) of the module docstring whose lines start with ``python`` or
``torchrun``. For each example:

* it states at least one command, and every command runs that very file;
* a ``make`` target it names runs that file;
* a command for it in README.md or docs/*.md is one the docstring states;
* the command runs: an example that another test already runs under torchrun
  (tests/test_examples_demo.py, test_elastic_example.py,
  test_post_local_example.py) must be run there with the stated launcher
  options and at least the stated script options, and is not run again here;
  any other example is run here, exactly as stated, with this venv's python
  for ``python`` and ``python -m torch.distributed.run`` for ``torchrun``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
LAUNCHERS = ("python", "torchrun")

# Examples that another test runs under torchrun: example -> (test module, test function).
RUN_ELSEWHERE = {
    "local_sgd_gloo.py": ("test_examples_demo", "test_demo_averages_and_ends_with_identical_params"),
    "elastic_recovery.py": ("test_elastic_example", "test_a_killed_rank_is_recovered_from_the_last_checkpoint"),
    "post_local_sgd.py": ("test_post_local_example", "test_example_runs_post_local_sgd_on_four_ranks"),
}


def _join_continued(lines: list[str]) -> list[str]:
    """Lines with a trailing backslash joined to the next one, as a shell reads them."""
    joined: list[str] = []
    pending = ""
    for line in lines:
        stripped = line.strip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


def _commands(lines: list[str]) -> list[list[str]]:
    """The shell commands among ``lines`` that start with python or torchrun, as tokens."""
    out = []
    for line in _join_continued(lines):
        words = line.split()
        if words and words[0] in LAUNCHERS:
            out.append(shlex.split(line, comments=True))
    return out


def literal_blocks(text: str) -> list[list[str]]:
    """The lines of each reStructuredText literal block (after a line ending in ``::``)."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::"):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block = []
            while j < len(lines) and (not lines[j].strip() or lines[j][:1].isspace()):
                block.append(lines[j])
                j += 1
            blocks.append(block)
            i = j
        else:
            i += 1
    return blocks


def stated_commands(path: Path) -> list[list[str]]:
    """The run commands of an example's module docstring."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return [command for block in literal_blocks(docstring) for command in _commands(block)]


def _script_index(tokens: list[str]) -> int:
    scripts = [i for i, token in enumerate(tokens) if token.endswith(".py")]
    assert len(scripts) == 1, f"a command should name one script, got {tokens}"
    return scripts[0]


def _executable(tokens: list[str]) -> list[str]:
    """``tokens`` with this venv's interpreter for ``python`` / ``torchrun``."""
    if tokens[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *tokens[1:]]
    assert tokens[0] == "python", tokens
    return [sys.executable, *tokens[1:]]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_the_parser_reads_a_continued_literal_block():
    text = 'Run it as::\n\n    torchrun --standalone \\\n        x.py --a 1\n\nmore text\n\n    python y.py\n'
    assert [c for b in literal_blocks(text) for c in _commands(b)] == [
        ["torchrun", "--standalone", "x.py", "--a", "1"]
    ]  # the indented line after a plain paragraph is not a literal block


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_every_example_states_a_command_that_runs_that_file(path):
    commands = stated_commands(path)
    assert commands, f"{path.name}: its docstring states no 'Run it with::' command"
    for tokens in commands:
        script = tokens[_script_index(tokens)]
        assert script == f"examples/{path.name}", (path.name, tokens)
        assert (ROOT / script).resolve() == path.resolve()


def _make_recipes() -> dict[str, str]:
    recipes: dict[str, str] = {}
    target = None
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith("\t") and target is not None:
            recipes[target] += line + "\n"
        elif m := re.match(r"^([\w.-]+):", line):
            target = m[1]
            recipes.setdefault(target, "")
        else:
            target = None
    return recipes


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_a_make_target_an_example_names_runs_it(path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    recipes = _make_recipes()
    assert "demo" in recipes and "test" in recipes  # the parser reads this Makefile
    for target in re.findall(r"``make (\w[\w-]*)``|`make (\w[\w-]*)`", docstring):
        name = next(t for t in target if t)
        assert name in recipes, f"{path.name} names `make {name}`, which the Makefile lacks"
        assert f"examples/{path.name}" in recipes[name], (
            f"{path.name} says `make {name}` runs it, but that target runs:\n{recipes[name]}"
        )


FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL = ("", "sh", "bash", "shell", "console", "text")


def _doc_commands(text: str) -> list[list[str]]:
    """Commands in the fenced shell blocks and the inline code spans of a markdown page."""
    found = []
    for m in FENCE.finditer(text):
        if m[1] in SHELL:
            found += _commands(m[2].splitlines())
    prose = FENCE.sub("", text)
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
        found += _commands([" ".join(span.split())])
    return found


def test_the_docs_state_the_commands_the_examples_state():
    stated = {f"examples/{p.name}": stated_commands(p) for p in EXAMPLES}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for tokens in _doc_commands(page.read_text(encoding="utf-8")):
            scripts = [t for t in tokens if t in stated]
            if not scripts:
                continue
            checked += 1
            assert tokens in stated[scripts[0]], (
                f"{page.relative_to(ROOT)} runs {scripts[0]} with {shlex.join(tokens)!r}; "
                f"its docstring says {[shlex.join(c) for c in stated[scripts[0]]]}"
            )
    assert checked >= 1  # docs/failures.md states one (the README names only make test and make demo)


class _Captured(Exception):
    """Raised by the stand-in for subprocess.run once it has seen the command."""


@pytest.mark.parametrize("name", sorted(RUN_ELSEWHERE))
def test_the_tests_that_run_an_example_run_its_stated_command(name, monkeypatch, tmp_path):
    module_name, function = RUN_ELSEWHERE[name]
    module = importlib.import_module(module_name)
    seen: list[list[str]] = []

    def capture(command, *args, **kwargs):
        seen.append([str(part) for part in command])
        raise _Captured

    monkeypatch.setattr(subprocess, "run", capture)
    test = getattr(module, function)
    fixtures = {"tmp_path": tmp_path} if "tmp_path" in inspect.signature(test).parameters else {}
    with pytest.raises(_Captured):
        test(**fixtures)  # stops at its first subprocess.run, which is the example's command
    ran = seen[0]

    for tokens in stated_commands(ROOT / "examples" / name):
        assert tokens[0] == "torchrun", tokens
        stated = _executable(tokens)
        i, j = _script_index(stated), _script_index(ran)
        # The same launcher, word for word: the processes, the restarts, the rendezvous.
        assert ran[:j] == stated[:i], (name, ran, stated)
        assert Path(ran[j]).resolve() == (ROOT / stated[i]).resolve()
        # The test may shorten the run (fewer steps) or move a folder, but it passes every
        # option the stated command passes.
        stated_options = {t for t in stated[i + 1 :] if t.startswith("--")}
        ran_options = {t for t in ran[j + 1 :] if t.startswith("--")}
        assert stated_options <= ran_options, (name, stated_options - ran_options)


RUN_HERE = [p for p in EXAMPLES if p.name not in RUN_ELSEWHERE]


@pytest.mark.parametrize("path", RUN_HERE, ids=_ids(RUN_HERE))
def test_an_example_no_other_test_runs_runs_as_stated(path):
    for tokens in stated_commands(path):
        command = _executable(tokens)
        done = subprocess.run(
            command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (
            f"{shlex.join(tokens)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )
        assert done.stdout.strip(), f"{shlex.join(tokens)} printed nothing"
