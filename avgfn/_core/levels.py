"""Levels of a hierarchy: ``(period, value)`` pairs, and group sizes that divide a world."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Union

PERIOD_ONE = (
    "{what} is 1: averaging parameters every step costs as much communication as "
    "all-reducing gradients every step (plain data parallel) and gains nothing over it"
)


Levels = Union[Mapping[int, Any], Sequence[tuple[int, Any]]]
"""``(period, value)`` pairs in strictly increasing period, or a mapping period -> value."""


def level_pairs(levels: Levels, name: str = "levels") -> list[tuple[int, Any]]:
    """Validate ``levels`` and return them as a list of ``(period, value)`` pairs.

    Checks what both [`hierarchical()`][avgfn.hierarchical] and the ``hierarchy`` builders need:
    non-empty, periods ints with the first ``> 0``, strictly increasing.
    Warns, as torch does, when the largest period is 1.
    """
    if isinstance(levels, Mapping):
        pairs = list(levels.items())
    elif isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(
            f"{name} must be a sequence of (period, value) pairs or a mapping period -> value, "
            f"got {type(levels).__name__}"
        )
    else:
        pairs = []
        for item in levels:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise TypeError(f"{name} must hold (period, value) pairs, got {item!r}")
            pairs.append((item[0], item[1]))
    if not pairs:
        raise ValueError(f"{name} must not be empty, got {levels!r}")
    periods = []
    for period, _ in pairs:
        if isinstance(period, bool) or not isinstance(period, int):
            raise TypeError(f"the periods of {name} must be ints, got {period!r}")
        periods.append(period)
    if periods[0] <= 0:
        raise ValueError(f"the first period of {name} must be > 0, got {periods[0]} in {periods}")
    for a, b in zip(periods, periods[1:]):
        if b <= a:
            raise ValueError(
                f"the periods of {name} must be strictly increasing, got {periods}"
            )
    if periods[-1] == 1:
        warnings.warn(PERIOD_ONE.format(what=f"the largest period of {name}"), UserWarning, stacklevel=3)
    return pairs


def group_sizes(
    period_group_sizes: Levels, total: int, total_name: str
) -> list[tuple[int, int]]:
    """Validate ``period -> group size`` levels against a group of ``total`` replicas.

    The shared checks of ``collectives.hierarchy`` and ``simulate.hierarchy``:
    the periods as `level_pairs()` checks them, every size an int ``>= 1``
    dividing ``total``, and the last size equal to ``total`` (``total_name``
    says what ``total`` is in the messages).
    """
    pairs = level_pairs(period_group_sizes, "period_group_sizes")
    for period, size in pairs:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"period_group_sizes: the group size of period {period} must be an int >= 1, "
                f"got {size!r}"
            )
        if total % size:
            raise ValueError(
                f"period_group_sizes: the group size {size} of period {period} does not divide "
                f"{total_name}, {total}"
            )
    if pairs[-1][1] != total:
        raise ValueError(
            f"period_group_sizes: the last group size must equal {total_name}, {total}; "
            f"got {pairs[-1][1]}"
        )
    return pairs
