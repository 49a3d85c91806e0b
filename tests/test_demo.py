"""``python -m avgfn.demo``: its data, its sharding, its byte accounting, and tiny runs of it."""

from __future__ import annotations

import gzip
import io
import struct
import sys

import pytest
import torch
from torch.func import vmap

import avgfn
from avgfn import simulate
from avgfn.demo import (
    ALGORITHMS,
    Config,
    CountingReduce,
    Ledger,
    Progress,
    batch_indices,
    load_digits,
    make_task,
    read_digits,
    run,
    shard_train,
    split,
)
from avgfn.demo.__main__ import main
from avgfn.demo._report import explain, find_overfitting, format_bytes, format_ratio

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The class sizes of the 1797 UCI test digits (the copy scikit-learn ships).
CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


# --- data ---------------------------------------------------------------------------------


def test_read_digits_is_the_uci_test_set():
    pixels, labels = read_digits()
    assert pixels.shape == (1797, 64) and labels.shape == (1797,)
    assert pixels.dtype == labels.dtype == torch.int64
    assert int(pixels.min()) == 0 and int(pixels.max()) == 16
    assert torch.bincount(labels, minlength=10).tolist() == CLASS_COUNTS
    # the first image is a 0: a ring of ink around an empty centre column
    first = pixels[0].reshape(8, 8)
    assert labels[0] == 0 and first[3:5, 3:5].sum() == 0 and first[:, 1:3].sum() > 40


def test_load_digits_scales_pixels_to_unit_range():
    pixels, labels = read_digits()
    x, y = load_digits()
    assert x.dtype == torch.float32 and x.shape == (1797, 64)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x * 16, pixels.to(torch.float32)) and torch.equal(y, labels)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1," * 63 + "1", "has 64 fields"),
        ("17," + "0," * 63 + "3", "pixel outside"),
        ("0," * 64 + "10", "label 10"),
        ("x," + "0," * 63 + "3", "not an int"),
    ],
)
def test_read_digits_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.csv.gz"
    good = "0," * 64 + "7"
    with gzip.open(path, "wt") as handle:
        handle.write(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"line 2 .*{message}"):
        read_digits(path)


def test_split_is_disjoint_covering_and_fixed_by_the_seed():
    x, y = load_digits()
    parts = split(x, y, test_size=297, seed=0)
    assert len(parts.train_y) == 1500 and len(parts.test_y) == 297
    train, test = set(parts.train_index.tolist()), set(parts.test_index.tolist())
    assert not train & test and train | test == set(range(1797))
    assert torch.equal(parts.train_x, x[parts.train_index]) and torch.equal(parts.test_y, y[parts.test_index])
    again = split(x, y, test_size=297, seed=0)
    assert torch.equal(again.test_index, parts.test_index)
    other = split(x, y, test_size=297, seed=1)
    assert not torch.equal(other.test_index, parts.test_index)
    # a random split keeps every class in the held-out part
    assert set(parts.test_y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="test_size"):
        split(x, y, test_size=1797)


@pytest.mark.parametrize("workers", [1, 3, 4, 8])
def test_shards_are_disjoint_blocks_that_cover_the_training_rows(workers):
    parts = split(*load_digits())
    xs, ys = shard_train(parts, workers)
    n = 1500 // workers
    assert xs.shape == (workers, n, 64) and ys.shape == (workers, n)
    # worker r holds rows [r n, (r + 1) n) of the training part: together, each row once
    assert torch.equal(xs.reshape(-1, 64), parts.train_x[: workers * n])
    assert torch.equal(ys.reshape(-1), parts.train_y[: workers * n])
    # so each of the first workers * n training rows is in exactly one shard, at one place
    assert 1500 - workers * n < workers


def test_shard_train_refuses_bad_worker_counts():
    parts = split(*load_digits())
    with pytest.raises(ValueError, match="workers"):
        shard_train(parts, 0)
    with pytest.raises(ValueError, match="1501 workers"):
        shard_train(parts, 1501)


def test_batch_indices_are_fixed_by_the_seed_and_stay_in_the_shard():
    idx = batch_indices(50, 4, 187, 32, seed=3)
    assert idx.shape == (50, 4, 32) and int(idx.min()) >= 0 and int(idx.max()) < 187
    assert torch.equal(idx, batch_indices(50, 4, 187, 32, seed=3))
    assert not torch.equal(idx, batch_indices(50, 4, 187, 32, seed=4))


# --- accounting ---------------------------------------------------------------------------


def _train_counting(avg_of, params, workers, steps):
    """Run ``avg_of(ledger)``'s averager on ``workers`` vmapped replicas; return the ledger."""
    ledger = Ledger()
    avg = avg_of(ledger)
    stacked = simulate.stack([params] * workers)
    stacked = {k: v + torch.arange(workers).reshape(-1, *[1] * (v.dim() - 1)) for k, v in stacked.items()}
    state = vmap(avg.init)(stacked)
    update = vmap(avg.update, in_dims=(0, 0, None))
    for step in range(steps):
        stacked, state = update(stacked, state, step)
    return ledger, stacked


def test_periodic_bytes_match_a_hand_count():
    params = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}  # 16 float32 = 64 bytes

    def periodic(ledger):
        return avgfn.periodic(4, reduce=CountingReduce(simulate.replica_mean(), ledger, "all"))

    ledger, stacked = _train_counting(periodic, params, workers=8, steps=8)
    # averaged at steps 0 and 4; the Reduce runs once per vmapped call for all 8 workers
    assert ledger.calls == {"all": 2} and ledger.bytes == {"all": 2 * 16 * 4}
    assert ledger.peak == 64 and ledger.total_calls == 2 and ledger.total_bytes == 128
    assert torch.equal(stacked["w"], torch.full((8, 3, 4), 3.5))  # and it did average


def test_hierarchical_bytes_by_level_and_dtype():
    params = {"w": torch.zeros(5, dtype=torch.float64)}  # 40 bytes

    def hierarchical(ledger):
        levels = simulate.hierarchy({2: 2, 4: 8}, 8)
        labels = {2: "pairs", 4: "all"}
        return avgfn.hierarchical([(p, CountingReduce(r, ledger, labels[p])) for p, r in levels])

    ledger, _ = _train_counting(hierarchical, params, workers=8, steps=8)
    # all 8 at steps 0 and 4, pairs at 2 and 6
    assert ledger.calls == {"all": 2, "pairs": 2}
    assert ledger.bytes == {"all": 80, "pairs": 80}


def test_counting_reduce_counts_every_buffer_and_forwards_the_group_capabilities():
    class Inner:
        size = 4
        agreed = []

        def __call__(self, t):
            return t

        def divisor(self):
            return 4

        def start(self, t):
            return avgfn.collectives.GroupMean.start  # never reached in this test

        def start_sum(self, t):
            class Done:
                def wait(self):
                    return t * 4

            return Done()

        def agree(self, digest, entries):
            self.agreed.append(entries())

        def commit(self):
            return True

    ledger = Ledger()
    counting = CountingReduce(Inner(), ledger, "x")
    out = avgfn.average({"w": torch.ones(3)}, counting)
    assert torch.equal(out["w"], torch.ones(3))  # the fused division went through the wrapper
    assert ledger.calls == {"x": 1} and ledger.bytes == {"x": 12}
    assert Inner.agreed and Inner.agreed[0][0][0] == "<step>"
    with pytest.raises(TypeError, match="Reduce"):
        CountingReduce(3, Ledger(), "x")


def test_every_algorithm_communicates_as_its_schedule_says():
    config = Config(workers=4, steps=32, eval_every=16)
    task = make_task(config)
    full = task.param_bytes
    assert full == 8970 * 4
    layer1 = (64 * 64 + 64) * 4
    expected = {
        # label -> calls, and the bytes of every call
        "sync-dp": ({"all 4": 32}, full),  # gradients, every step
        "local-sgd-4": ({"all 4": 8}, full),  # steps 0, 4, ..., 28
        "local-sgd-16": ({"all 4": 2}, full),  # steps 0, 16
        "post-local-sgd": ({"all 4": 8 + 2}, full),  # gradients at 0..7, params at 8, 24
        "hierarchical": ({"all 4": 2, "groups of 2": 6}, full),  # all at 0, 16; pairs at 4, 8, ...
        "diloco": ({"all 4": 2}, full),  # after steps 15 and 31
        "streaming-diloco": ({"all 4": 4}, None),  # fragment 0 sent at 6, 22; fragment 1 at 14, 30
        "overlapped-diloco": ({"all 4": 2}, full),  # started after steps 15 and 31, each applied a round later
        "slowmo": ({"all 4": 2}, full),
    }
    assert set(expected) == set(ALGORITHMS)
    for name, (calls, each) in expected.items():
        result = run(name, task)
        assert result.ledger.calls == calls, name
        if each is not None:
            assert result.ledger.total_bytes == sum(calls.values()) * each, name
            assert result.ledger.peak == each, name
        else:  # two fragments: layer 1, then the rest, twice each
            assert result.ledger.total_bytes == 2 * full and result.ledger.peak == full - layer1
        assert result.curve[-1][1:3] == (result.ledger.total_calls, result.ledger.total_bytes)
        # the workers trained on different shards: they differ unless the last step synced them
        spread = max(float((p.amax(0) - p.amin(0)).max()) for p in result.params.values())
        synced_at_end = name in ("sync-dp", "diloco", "slowmo")
        assert (spread == 0.0) == synced_at_end, (name, spread)
        assert result.test_acc > 0.5, name  # 32 steps already learn something


# --- the command line ---------------------------------------------------------------------


def _main(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_tiny_demo_prints_the_table_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the figure needs the demo extra (matplotlib)")
    figure = tmp_path / "sub" / "demo.png"
    code, out, err = _main(
        "--steps", "12", "--workers", "4", "--eval-every", "4", "--no-torchrun",
        "--algorithms", "sync-dp,local-sgd-4,diloco,hierarchical", "--out", str(figure),
    )  # fmt: skip
    assert code == 0, out + err
    table = [line.split() for line in out.splitlines() if line and not line.startswith(" ")]
    rows = {cells[0]: cells for cells in table if cells[0] in ALGORITHMS}
    assert list(rows) == ["sync-dp", "local-sgd-4", "diloco", "hierarchical"]
    assert rows["sync-dp"][5] == "12" and rows["local-sgd-4"][5] == "3" and rows["diloco"][5] == "0"
    assert rows["local-sgd-4"][8] == "1/4" and rows["diloco"][8] == "0"
    assert f"figure: {figure.resolve()}" in out
    (width, height), size = _png_size(figure)
    assert width > 500 and height > 200 and size > 20_000
    assert "hierarchical" in err and "100%" in err  # the progress notes and bar


def test_without_matplotlib_the_demo_still_prints_the_table(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    figure = tmp_path / "demo.png"
    code, out, _ = _main("--steps", "4", "--workers", "2", "--algorithms", "local-sgd-2", "--no-torchrun", "--out", str(figure))
    assert code == 0
    assert "local-sgd-2" in out and "figure skipped: matplotlib is not installed" in out
    assert not figure.exists()


def test_help_lists_the_algorithms_and_the_settings(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--algorithms", "--workers", "--steps", "--batch-size", "--out", "--no-torchrun", "--seed"):
        assert option in text
    for name in ALGORITHMS:
        assert name in text


def test_bad_settings_are_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--algorithms", "sync-dp,fedsgd"])
    assert exit_.value.code == 2 and "unknown algorithm 'fedsgd'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--workers", "0"])
    code, _, err = _main("--workers", "3", "--algorithms", "hierarchical", "--no-torchrun")
    assert code == 2 and "even number of workers" in err


def test_progress_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = Progress(3, stream=out, width=6, interval=0.0)
    for _ in range(3):
        bar.advance("diloco")
    bar.close()
    text = out.getvalue()
    assert text.count("\r") >= 3 and "diloco [######] 100%" in text and text.endswith("\n")


def test_report_formats():
    assert format_bytes(17_222_400) == "17.22 MB" and format_bytes(12) == "12 B"
    assert format_ratio(480, 30) == "1/16" and format_ratio(480, 143) == "1/3.4"


# --- the notes under the table, and the figure ---------------------------------------------


def _points(test, train, acc=None, every=16):
    acc = acc or [0.9] * len(test)
    return [(every * i, t, a, tr) for i, (t, a, tr) in enumerate(zip(test, acc, train))]


FALLING = [2.3, 0.8, 0.4, 0.25, 0.2, 0.18, 0.16, 0.15]
# DiLoCo's shape in the study: lowest at step 128, then up while the training loss goes to 0.
OVERFIT_TEST = [2.3, 0.8, 0.25, 0.21, 0.206, 0.24, 0.26, 0.29, 0.33]
OVERFIT_TRAIN = [2.3, 0.7, 0.21, 0.12, 0.062, 0.035, 0.017, 0.005, 0.0002]


def test_find_overfitting_reports_the_minimum_and_the_end():
    found = find_overfitting(_points(OVERFIT_TEST, OVERFIT_TRAIN))
    assert found is not None
    assert (found.best_step, found.best_loss, found.end_step, found.end_loss) == (64, 0.206, 128, 0.33)
    assert (found.train_at_best, found.train_at_end) == (0.062, 0.0002)


@pytest.mark.parametrize(
    "test, train",
    [
        (FALLING, FALLING),  # both keep falling: nothing to explain
        ([*FALLING[:-1], 0.4], FALLING),  # one bad last point is not a rise
        ([*FALLING[:-2], 0.4, 0.15], FALLING),  # nor is a spike
        ([*FALLING[:-2], 0.17, 0.165], FALLING),  # up by less than 20%
        (OVERFIT_TEST, [*OVERFIT_TRAIN[:5], 0.07, 0.1, 0.2, 0.5]),  # diverging: train rises too
        (OVERFIT_TEST, [*OVERFIT_TRAIN[:5], 0.06, 0.06, 0.06, 0.058]),  # train flat: not overfitting
        ([2.0, 1.0], [2.0, 1.0]),  # too short to say
    ],
)
def test_find_overfitting_stays_quiet_where_there_is_none(test, train):
    assert find_overfitting(_points(test, train)) is None


def _result(name, test, train, acc=None):
    from avgfn.demo import Result

    acc = acc or [0.95] * len(test)
    curve = [(16 * i, i, 1000 * i, t, a, tr) for i, (t, a, tr) in enumerate(zip(test, acc, train))]
    return Result(name, f"{name} did it", curve, train[-1], 0.99, test[-1], acc[-1], Ledger(), {}, 0.0)


def test_explain_says_overfitting_with_the_step_and_what_the_accuracy_did():
    quiet = _result("sync-dp", FALLING, FALLING)
    holds = _result("diloco", OVERFIT_TEST, OVERFIT_TRAIN, [0.9, 0.93, 0.94, 0.949, 0.949, 0.95, 0.96, 0.96, 0.966])
    drops = _result("slowmo", OVERFIT_TEST, OVERFIT_TRAIN, [0.9, 0.93, 0.94, 0.95, 0.96, 0.95, 0.93, 0.92, 0.91])
    assert explain([quiet]) == []
    text = " ".join(line.strip() for line in explain([quiet, holds, drops]))
    assert "sync-dp" not in text
    assert text.startswith("diloco: overfitting. Its held-out loss is lowest at step 64 (0.206) and rises to "
                           "0.330 by step 128, while its training loss falls from 0.062 to 0.000.")
    assert "accuracy does not drop (94.9% at step 64, 96.6% at the end)" in text
    assert "slowmo: overfitting." in text and "accuracy drops too (96.0% at step 64, 91.0% at the end)" in text
    assert all(len(line) <= 100 for line in explain([holds, drops]))


def test_the_demo_prints_the_notes_under_its_table(monkeypatch, tmp_path):
    import avgfn.demo.__main__ as demo_main

    results = [_result("sync-dp", FALLING, FALLING), _result("diloco", OVERFIT_TEST, OVERFIT_TRAIN)]
    monkeypatch.setattr(demo_main, "run_study", lambda names, config, progress=None: (None, results))
    code, out, _ = _main("--no-torchrun", "--workers", "2", "--steps", "128", "--algorithms", "sync-dp,diloco",
                         "--out", str(tmp_path / "demo.png"))  # fmt: skip
    assert code == 0, out
    after_table = out[out.index("diloco did it") :]
    assert "Why a curve does what it does:\n  diloco: overfitting. Its held-out loss is lowest at step 64" in after_table
    assert "sync-dp: overfitting" not in out


def test_the_figure_has_a_legend_in_each_panel_and_lines_told_apart():
    pytest.importorskip("matplotlib", reason="the figure needs the demo extra (matplotlib)")
    from avgfn.demo._plot import figure

    names = list(ALGORITHMS)
    results = [_result(name, FALLING, FALLING) for name in names]
    fig = figure(results, make_task(Config(workers=2, steps=4)))
    by_step, by_bytes = fig.axes
    looks = {}
    for axes in (by_step, by_bytes):
        legend = axes.get_legend()
        assert legend is not None, axes.get_xlabel()
        assert [t.get_text() for t in legend.get_texts()] == names
        lines = axes.get_lines()
        assert [line.get_label() for line in lines] == names
        look = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines]
        # every line differs from every other in its colour, and in its dash or its marker
        assert len({c for c, _, _ in look}) == len(names)
        assert len({(d, m) for _, d, m in look}) == len(names)
        for name, each in zip(names, look):
            assert looks.setdefault(name, each) == each  # the same look in both panels


# --- the real run -------------------------------------------------------------------------


def test_real_gloo_run_matches_its_simulation():
    # One torchrun launch, three algorithms that use every kind of collective:
    # DiLoCo (an outer step, the replica check at init), hierarchical (subgroups)
    # and post-local SGD (gradients, then params).
    from avgfn.demo._real import compare, real_run

    names = ["diloco", "hierarchical", "post-local-sgd"]
    config = Config(workers=4, steps=32, eval_every=32)
    real = real_run(names, config)
    task = make_task(config)
    for name in names:
        outputs = real[name]
        assert [o["master_addr"] for o in outputs] == ["127.0.0.1"] * 4
        simulated = run(name, task)
        result = compare(outputs, simulated)
        assert result.ledgers_match, (name, outputs[0]["calls"], simulated.ledger.calls)
        assert result.max_abs_diff < 1e-6, (name, result)
        # a real difference is caught: rank 1 compared with replica 0 is far off
        swapped = [outputs[1], outputs[0], *outputs[2:]]
        if name != "diloco":  # DiLoCo's last step synced every rank: all equal
            assert not compare(swapped, simulated).ok, name
