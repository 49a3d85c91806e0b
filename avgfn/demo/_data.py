"""The demo's task: the UCI handwritten digits, a fixed held-out split, one shard per worker.

The images ship with avgfn (``avgfn/demo/data/digits.csv.gz``, credited in the
README beside it): 1797 grey-scale 8x8 digits, one per line of the CSV as 64
pixel counts from 0 to 16 followed by the label 0..9. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Union

import attrs
import torch

from avgfn import simulate

__all__ = ["DATA", "Split", "batch_indices", "load_digits", "read_digits", "shard_train", "split"]

DATA = Path(__file__).resolve().parent / "data" / "digits.csv.gz"
"""Where the digits ship: a gzipped CSV with no header."""

PIXELS = 64
CLASSES = 10
MAX_PIXEL = 16


def read_digits(path: Union[str, Path] = DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the digits CSV as it is stored: pixel counts and labels.

    Args:
      path: a gzipped CSV of rows of 64 ints in ``[0, 16]`` and a label in ``[0, 9]``.

    Returns:
      ``(pixels, labels)``: an int64 tensor ``(N, 64)`` and an int64 tensor ``(N,)``.

    Raises:
      ValueError: a row without 65 fields, a field that is not an int, or a
        value out of range (the message names the line).

    Examples:
      >>> from avgfn.demo import read_digits
      >>> pixels, labels = read_digits()
      >>> tuple(pixels.shape), tuple(labels.shape), int(pixels.max()), labels[:5].tolist()
      ((1797, 64), (1797,), 16, [0, 1, 2, 3, 4])
    """
    rows: list[list[int]] = []
    with gzip.open(path, "rt", newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if len(row) != PIXELS + 1:
                raise ValueError(f"{path}: line {line} has {len(row)} fields, expected {PIXELS + 1}")
            try:
                values = [int(v) for v in row]
            except ValueError:
                raise ValueError(f"{path}: line {line} holds a field that is not an int: {row}") from None
            if not all(0 <= v <= MAX_PIXEL for v in values[:PIXELS]):
                raise ValueError(f"{path}: line {line} has a pixel outside [0, {MAX_PIXEL}]")
            if not 0 <= values[PIXELS] < CLASSES:
                raise ValueError(f"{path}: line {line} has the label {values[PIXELS]}, not in 0..9")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no rows")
    table = torch.tensor(rows, dtype=torch.int64)
    return table[:, :PIXELS].contiguous(), table[:, PIXELS].contiguous()


def load_digits(path: Union[str, Path] = DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as a model takes them: float32 pixels scaled to ``[0, 1]``, int64 labels.

    Examples:
      >>> from avgfn.demo import load_digits
      >>> x, y = load_digits()
      >>> x.dtype, float(x.min()), float(x.max()), sorted(set(y.tolist()))
      (torch.float32, 0.0, 1.0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    pixels, labels = read_digits(path)
    return pixels.to(torch.float32) / MAX_PIXEL, labels


@attrs.frozen(eq=False)
class Split:
    """A train / held-out split of the digits.

    Attributes:
      train_x, train_y: the training images ``(N_train, 64)`` and labels.
      test_x, test_y: the held-out images and labels, never trained on.
      train_index, test_index: the rows of the full dataset each part holds.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_index: torch.Tensor
    test_index: torch.Tensor


def split(x: torch.Tensor, y: torch.Tensor, *, test_size: int = 297, seed: int = 0) -> Split:
    """Hold out ``test_size`` random rows (fixed by ``seed``); the rest is for training.

    Args:
      x, y: the images and labels, of the same length N.
      test_size: rows held out, ``0 < test_size < N``.
      seed: the seed of the random permutation; the same seed gives the same split.

    Returns:
      A `Split`.

    Raises:
      ValueError: ``test_size`` out of range, or ``x`` and ``y`` of different lengths.

    Examples:
      >>> from avgfn.demo import load_digits, split
      >>> parts = split(*load_digits())
      >>> len(parts.train_y), len(parts.test_y)
      (1500, 297)
    """
    n = len(y)
    if len(x) != n:
        raise ValueError(f"split: x has {len(x)} rows but y has {n}")
    if isinstance(test_size, bool) or not isinstance(test_size, int) or not 0 < test_size < n:
        raise ValueError(f"split: test_size must be an int in (0, {n}), got {test_size!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return Split(x[train], y[train], x[test], y[test], train, test)


def shard_train(parts: Split, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each of ``workers`` workers its own contiguous block of the training rows.

    The training rows are trimmed to a multiple of ``workers`` (at most
    ``workers - 1`` rows unused) and split with [`avgfn.simulate.shard()`][avgfn.simulate.shard]:
    worker ``r`` holds block ``r``, and no row is in two blocks.

    Returns:
      ``(x, y)`` of shapes ``(workers, n, 64)`` and ``(workers, n)``,
      ``n = N_train // workers``.

    Raises:
      ValueError: ``workers < 1`` or more workers than training rows.

    Examples:
      >>> from avgfn.demo import load_digits, shard_train, split
      >>> x, y = shard_train(split(*load_digits()), 8)
      >>> tuple(x.shape), tuple(y.shape)                # 4 of the 1500 rows are left out
      ((8, 187, 64), (8, 187))
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"shard_train: workers must be an int >= 1, got {workers!r}")
    n = len(parts.train_y)
    if workers > n:
        raise ValueError(f"shard_train: {workers} workers but only {n} training rows")
    usable = n - n % workers
    return simulate.shard((parts.train_x[:usable], parts.train_y[:usable]), workers)


def batch_indices(steps: int, workers: int, shard_size: int, batch_size: int, seed: int) -> torch.Tensor:
    """The mini-batches of a run: for each step and worker, ``batch_size`` rows of its shard.

    Drawn with replacement from a generator seeded by ``seed``, all at once,
    so a simulated run and W real processes (each taking its own column)
    train on exactly the same batches.

    Returns:
      An int64 tensor ``(steps, workers, batch_size)`` of indices in ``[0, shard_size)``.

    Examples:
      >>> from avgfn.demo import batch_indices
      >>> idx = batch_indices(3, 2, 10, 4, seed=0)
      >>> tuple(idx.shape), bool((idx >= 0).all() and (idx < 10).all())
      ((3, 2, 4), True)
      >>> bool((idx == batch_indices(3, 2, 10, 4, seed=0)).all())
      True
    """
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, shard_size, (steps, workers, batch_size), generator=generator)
