"""Corrupt and foreign checkpoints: refused with a message naming the key, never half-loaded.

``tests/test_checkpoint.py`` covers the basic strictness of
``avgfn.load_state_dict`` on the core states; here: the states of every kind
of averager (counters, tuples of global params, optimizer states,
error-feedback residuals, nested chains), each key tampered with in turn, a
checkpoint of another algorithm, files cut short, files from
``torch.save`` of objects ``weights_only`` refuses, and what a flipped bit
does. ``docs/failures.md`` describes what the user sees in each case; its
code blocks run here.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree

import avgfn
from avgfn import optim
from avgfn import chain
from avgfn import diloco
from avgfn import slowmo
from avgfn import streaming_diloco
from avgfn import ema
from avgfn import fedavg
from avgfn.testing import peers_mean

ROOT = Path(__file__).resolve().parents[1]


def _params() -> dict[str, torch.Tensor]:
    # 1-D leaves: error_feedback=True fails on others (a bug reported to the lead).
    return {"w": torch.arange(6.0), "b": torch.ones(3, dtype=torch.float64)}


def _averagers() -> dict[str, avgfn.Averager]:
    reduce = peers_mean(lambda t: t * 0.5)
    return {
        "periodic": avgfn.periodic(2, reduce=reduce),
        "periodic_feedback": avgfn.periodic(2, reduce=reduce, round=avgfn.Round(comm_dtype=torch.bfloat16, error_feedback=True)),
        "hierarchical": avgfn.hierarchical([(2, reduce), (4, reduce)]),
        "diloco": diloco(2, reduce=reduce, outer_optimizer=optim.adamw(0.1)),
        "streaming": streaming_diloco(4, reduce=reduce, num_fragments=2, delay=1),
        "slowmo": slowmo(4, reduce=reduce, lr=0.1, base_period=2),
        "fedavg": fedavg(2, reduce=reduce, weight=2.0),
        "ema": ema(0.9),
        "chain": chain(diloco(2, reduce=reduce), ema(0.5)),
    }


NAMES = sorted(_averagers())


def _trained(name: str) -> tuple[avgfn.Averager, Any]:
    """An averager and its state after a few steps (so that nothing is at its initial value)."""
    avg = _averagers()[name]
    params = _params()
    state = avg.init(params)
    for step in range(5):
        params = {k: v * 0.9 + 0.1 for k, v in params.items()}
        params, state = avg.update(params, state, step)
    return avg, state


def _roundtrip(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(
        (torch.equal(x, y) and x.dtype == y.dtype) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(la, lb)
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_state_round_trips_through_weights_only(name):
    avg, state = _trained(name)
    loaded = avgfn.load_state_dict(avg.init(_params()), _roundtrip(avgfn.state_dict(state)))
    assert type(loaded) is type(state) and _same(loaded, state)


def _tampered(value: Any) -> list[tuple[str, Any, type, str]]:
    """Ways to spoil one saved value: (what, new value, exception, words in its message)."""
    if isinstance(value, torch.Tensor):
        other = torch.float32 if value.dtype != torch.float32 else torch.float64
        return [
            ("a number", 3, TypeError, "must be a tensor, got int"),
            ("a list", value.tolist(), TypeError, "must be a tensor, got"),
            ("another shape", torch.zeros(value.numel() + 1, dtype=value.dtype), ValueError, "of shape"),
            ("another dtype", value.to(other), ValueError, f"must be a {value.dtype} tensor"),
        ]
    return [("a string", "x", TypeError, f"must be {type(value).__name__}, got str")]


@pytest.mark.parametrize("name", NAMES)
def test_each_spoiled_key_is_named_and_nothing_is_built(name):
    avg, state = _trained(name)
    saved = _roundtrip(avgfn.state_dict(state))
    template = avg.init(_params())
    template_copy = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, template)
    tried = 0
    for key, value in saved.items():
        for what, bad, exc, words in _tampered(value):
            spoiled = dict(saved)
            spoiled[key] = bad
            with pytest.raises(exc) as info:
                avgfn.load_state_dict(template, spoiled)
            message = str(info.value)
            assert message.startswith(f"load_state_dict: {key!r}"), (name, key, what, message)
            assert words in message, (name, key, what, message)
            tried += 1
        # a missing key, and an unknown one next to it
        partial = {k: v for k, v in saved.items() if k != key}
        with pytest.raises(ValueError, match=re.escape(f"missing keys [{key!r}], unknown keys []")):
            avgfn.load_state_dict(template, partial)
        both = f"missing keys [{key!r}], unknown keys [{key + '_old'!r}]"
        with pytest.raises(ValueError, match=re.escape(both)):
            avgfn.load_state_dict(template, {**partial, f"{key}_old": value})
    assert tried >= len(saved)
    assert _same(template, template_copy)  # loading is pure: the template is untouched


def test_a_checkpoint_of_another_algorithm_is_refused():
    states = {name: _trained(name)[1] for name in NAMES}
    templates = {name: _averagers()[name].init(_params()) for name in NAMES}
    for saved_by in NAMES:
        saved = _roundtrip(avgfn.state_dict(states[saved_by]))
        for loaded_by in NAMES:
            if loaded_by == saved_by:
                continue
            if avgfn.state_dict(templates[loaded_by]).keys() == saved.keys() and all(
                _compatible(templates[loaded_by], saved)
            ):
                continue  # the same fields, shapes and dtypes: nothing can tell them apart
            with pytest.raises((ValueError, TypeError), match="^load_state_dict: "):
                avgfn.load_state_dict(templates[loaded_by], saved)


def _compatible(template: Any, saved: dict) -> list[bool]:
    out = []
    for key, leaf in avgfn.state_dict(template).items():
        value = saved[key]
        if isinstance(leaf, torch.Tensor):
            out.append(
                isinstance(value, torch.Tensor) and value.shape == leaf.shape and value.dtype == leaf.dtype
            )
        else:
            out.append(type(value) is type(leaf))
    return out


def test_periodic_and_fedavg_states_cannot_be_confused():
    # Different fields: the message lists what is missing and what is unknown.
    _, state = _trained("fedavg")
    with pytest.raises(ValueError, match=re.escape("missing keys [], unknown keys ['.skipped']")):
        avgfn.load_state_dict(_averagers()["periodic"].init(_params()), avgfn.state_dict(state))


def test_a_state_dict_that_is_not_a_mapping_is_refused():
    template = _averagers()["periodic"].init(_params())
    for bad in ([("rounds", 1)], torch.zeros(1), None):
        with pytest.raises(TypeError, match="load_state_dict: state_dict must be a mapping"):
            avgfn.load_state_dict(template, bad)
    with pytest.raises(ValueError, match=re.escape("missing keys ['.rounds'], unknown keys [0]")):
        avgfn.load_state_dict(template, {0: torch.tensor(1)})


# --- files -------------------------------------------------------------------------------


def _checkpoint_bytes() -> bytes:
    avg, state = _trained("diloco")
    buffer = io.BytesIO()
    torch.save({"step": 5, "params": _params(), "averager": avgfn.state_dict(state)}, buffer)
    return buffer.getvalue()


# What torch 2.13's torch.load(weights_only=True) raises on a file cut short,
# depending on where the cut falls (an empty file, the pickle, the zip records
# or the zip directory at the end).
TRUNCATED = (EOFError, pickle.UnpicklingError, RuntimeError, ValueError)


def test_a_truncated_file_fails_cleanly():
    data = _checkpoint_bytes()
    n = len(data)
    cuts = sorted({0, 1, 10, 100, n // 2, n - 100, n - 22, n - 1} | set(range(0, n, 97)))
    seen = set()
    for cut in cuts:
        with pytest.raises(TRUNCATED) as info:
            torch.load(io.BytesIO(data[:cut]), weights_only=True)
        seen.add(type(info.value))
    # Most cuts leave a zip without its central directory: torch says so.
    with pytest.raises(RuntimeError, match="failed finding central directory"):
        torch.load(io.BytesIO(data[: len(data) // 2]), weights_only=True)
    assert RuntimeError in seen
    # The whole file loads.
    assert torch.load(io.BytesIO(data), weights_only=True)["step"] == 5


def test_a_truncated_file_on_disk_fails_cleanly(tmp_path):
    data = _checkpoint_bytes()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(RuntimeError, match="PytorchStreamReader failed reading zip archive"):
        torch.load(path, weights_only=True)


def test_objects_weights_only_refuses():
    # Saving the state record itself (instead of avgfn.state_dict of it) makes a file
    # that the safe loader refuses, naming the class.
    _, state = _trained("periodic")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="PeriodicState"):
        torch.load(buffer, weights_only=True)


def test_a_flipped_bit_in_tensor_data_is_not_detected_by_torch_load():
    # torch.load checks the zip structure, not the bytes of the tensors: a bit
    # flipped in the data loads silently (docs/failures.md says so and shows
    # how to add a digest).
    params = {"w": torch.full((64,), 1.0)}
    buffer = io.BytesIO()
    torch.save(params, buffer)
    data = bytearray(buffer.getvalue())
    at = bytes(data).find(bytes(torch.tensor([1.0] * 4).view(torch.uint8).tolist()))
    assert at > 0
    data[at + 3] ^= 0x01
    loaded = torch.load(io.BytesIO(bytes(data)), weights_only=True)
    assert not torch.equal(loaded["w"], params["w"])


def test_the_failures_page_runs(tmp_path, monkeypatch):
    from test_readme import run_page

    monkeypatch.chdir(tmp_path)
    assert run_page(ROOT / "docs" / "failures.md") >= 3
