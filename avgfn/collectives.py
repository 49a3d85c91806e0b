"""Reduces over real ``torch.distributed`` process groups.

This is the only module of avgfn that imports ``torch.distributed``: the
algorithms only ever see a :class:`avgfn.Reduce`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from avgfn._hierarchical import level_pairs

__all__ = ["GroupMean", "all_reduce_mean", "hierarchy"]


class GroupMean:
    """A :class:`avgfn.Reduce` over a process group: divide, then all-reduce a sum.

    The arithmetic is torch's own in ``average_parameters`` (each rank divides
    by the group size, then the group sums), so results match torch bit for
    bit. A rank outside the group gets its input back unchanged.

    Attributes:
      group: the process group (``None``: the default group).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group

    def _group(self) -> Any:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "all_reduce_mean: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first"
            )
        return self.group if self.group is not None else dist.group.WORLD

    @property
    def size(self) -> int:
        """The number of ranks in the group (0 on a rank outside it)."""
        group = self._group()
        if dist.get_rank(group) < 0:
            return 0
        return dist.get_world_size(group)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        group = self._group()
        if dist.get_rank(group) < 0:
            return tensor
        tensor.div_(dist.get_world_size(group))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def __repr__(self) -> str:
        return f"all_reduce_mean(group={self.group!r})"


def all_reduce_mean(group: Optional[dist.ProcessGroup] = None) -> GroupMean:
    """The Reduce of a real process group: the mean over its ranks.

    Args:
      group: a process group; ``None`` means the default group, looked up at
        each call (so the Reduce may be built before ``init_process_group``).
        On a rank that is not in ``group`` (``dist.new_group`` hands such a
        rank a placeholder), the Reduce returns its input unchanged.

    Returns:
      A :class:`GroupMean`, callable as ``reduce(tensor) -> tensor``. It writes
      into its argument (the averagers hand it a buffer of their own).

    Examples:
      >>> import tempfile, torch, torch.distributed as dist, avgfn
      >>> store = tempfile.NamedTemporaryFile(delete=False).name
      >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
      >>> reduce = avgfn.collectives.all_reduce_mean()
      >>> avgfn.average({"w": torch.tensor([1.0, 2.0])}, reduce)
      {'w': tensor([1., 2.])}
      >>> dist.destroy_process_group()
    """
    if not (
        group is None
        or isinstance(group, dist.ProcessGroup)
        or group is dist.GroupMember.NON_GROUP_MEMBER  # what new_group gives a non-member
    ):
        raise TypeError(f"group must be a ProcessGroup or None, got {group!r}")
    return GroupMean(group)


PeriodGroupSizes = Union[Mapping[int, int], Sequence[tuple[int, int]]]


def hierarchy(
    period_group_sizes: PeriodGroupSizes,
    group: Optional[dist.ProcessGroup] = None,
) -> list[tuple[int, GroupMean]]:
    """Build the levels of :func:`avgfn.hierarchical` on real process groups.

    The groups are made exactly as torch's ``HierarchicalModelAverager`` makes
    them: a level whose size is that of ``group`` uses ``group`` itself; any
    other size uses ``dist.new_subgroups(group_size=size, group=group)``, i.e.
    consecutive ranks. Every rank must call this, in the same order (it creates
    process groups).

    Args:
      period_group_sizes: ``period -> group size`` (a mapping, as torch's
        ``period_group_size_dict``, or ``(period, size)`` pairs), in strictly
        increasing period. The last size must be the size of ``group``.
      group: the overall group; ``None`` means the default group.

    Returns:
      ``[(period, reduce), ...]``, ready for :func:`avgfn.hierarchical`.

    Raises:
      ValueError: empty or non-increasing periods, a first period ``<= 0``, a
        size that does not divide the size of ``group``, or a last size that
        differs from it.
    """
    pairs = level_pairs(period_group_sizes, "period_group_sizes")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "hierarchy: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    overall = dist.get_world_size(group)
    sizes = []
    for period, size in pairs:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"period_group_sizes: the group size of period {period} must be an int >= 1, "
                f"got {size!r}"
            )
        if overall % size:
            raise ValueError(
                f"period_group_sizes: the group size {size} of period {period} does not divide "
                f"the size of group, {overall}"
            )
        sizes.append(size)
    if sizes[-1] != overall:
        raise ValueError(
            f"period_group_sizes: the last group size must equal the size of group, {overall}; "
            f"got {sizes[-1]}"
        )
    levels = []
    for (period, _), size in zip(pairs, sizes):
        if size == overall:
            sub = group
        else:
            sub, _ = dist.new_subgroups(group_size=size, group=group)
        levels.append((period, GroupMean(sub)))
    return levels
