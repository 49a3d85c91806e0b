"""What a user's type checker sees: the package ships ``py.typed``, so its types are its API.

A small user program is checked with mypy's API. Each line that must be reported carries
``# E: <part of the message>``; every other line must check clean. torch is left out of the
analysis (its stubs take a minute to read cold), which leaves what this test is about: the
records' constructors, their ``replace`` and their frozenness, and the options of
``avgfn.Round``.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import mypy.api
import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = textwrap.dedent(
    """
    import torch
    import avgfn

    rounds = torch.zeros((), dtype=torch.int64)
    state = avgfn.PeriodicState(rounds=rounds, residual=None)
    positional = avgfn.PeriodicState(rounds, None)
    later: avgfn.PeriodicState = state.replace(rounds=rounds + 1)
    options = avgfn.Round(donate=True)
    averager: avgfn.Averager = avgfn.periodic(4, reduce=lambda t: t, round=options)

    avgfn.Round(donat=True)  # E: Unexpected keyword argument "donat" for "Round"
    avgfn.PeriodicState(round=rounds, residual=None)  # E: Unexpected keyword argument "round"
    avgfn.PeriodicState(rounds=rounds)  # E: Missing positional argument "residual"
    state.replace(rounds=rounds).no_such_field  # E: "PeriodicState" has no attribute "no_such_field"
    state.rounds = rounds  # E: is read-only
    """
)

_REPORT = re.compile(r"user_code\.py:(\d+): error: (.*)$")


def _expected() -> dict[int, str]:
    return {
        number: line.split("# E: ", 1)[1]
        for number, line in enumerate(USER_CODE.splitlines(), start=1)
        if "# E: " in line
    }


def _check(tmp_path: Path, cache: Path, python_version: str) -> dict[int, list[str]]:
    """mypy's errors on the user code, by line (errors inside avgfn or torch are not its concern)."""
    source = tmp_path / "user_code.py"
    source.write_text(USER_CODE, encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text(
        textwrap.dedent(
            f"""
            [mypy]
            strict = True
            python_version = {python_version}
            mypy_path = {ROOT}
            cache_dir = {cache}
            [mypy-torch.*]
            follow_imports = skip
            follow_imports_for_stubs = True
            """
        ),
        encoding="utf-8",
    )
    stdout, stderr, status = mypy.api.run(
        ["--config-file", str(config), "--hide-error-context", "--no-pretty", str(source)]
    )
    assert status in (0, 1), f"mypy did not run:\n{stdout}\n{stderr}"
    found: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        match = _REPORT.search(line)
        if match:
            found.setdefault(int(match.group(1)), []).append(match.group(2))
    return found


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy_cache")


# The oldest Python the package supports (where dataclass_transform comes from
# typing_extensions) and the one running the tests.
@pytest.mark.parametrize("python_version", ["3.10", f"{sys.version_info[0]}.{sys.version_info[1]}"])
def test_records_and_round_options_type_check_as_declared(
    tmp_path: Path, mypy_cache: Path, python_version: str
) -> None:
    found = _check(tmp_path, mypy_cache, python_version)
    expected = _expected()
    unexpected = {n: m for n, m in found.items() if n not in expected}
    assert not unexpected, f"lines that should check clean were reported: {unexpected}"
    for number, part in expected.items():
        messages = found.get(number, [])
        assert any(part in m for m in messages), (
            f"line {number} ({USER_CODE.splitlines()[number - 1].strip()!r}) should be reported "
            f"with {part!r}; mypy said {messages}"
        )
