"""The mean over simulated replicas: a Reduce that ``torch.func.vmap`` batches.

W replicas live in one process as tensors with a leading replica dimension;
the training step runs on one replica at a time under ``torch.func.vmap``. The
averagers then hand the Reduce a flat buffer that is, to ``vmap``, one
replica's buffer, and physically the W buffers side by side. The Reduce here is
a ``torch.library`` custom operator whose vmap rule sees that physical tensor
and answers, for each replica, the mean over its group of replicas.

Outside ``vmap`` there is one replica: the operator answers a copy of its
input, the mean over a group of one.

Under nested ``vmap`` the rule runs at the innermost level that batches the
buffer (torch skips a level whose inputs it does not batch); see
[`replica_mean()`][avgfn.simulate.replica_mean].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

from avgfn._core.levels import group_sizes

__all__ = ["ReplicaMean", "hierarchy", "replica_mean"]

# ``group_size`` travels to the operator as an int; 0 stands for "all replicas".
_ALL = 0


@torch.library.custom_op("avgfn::replica_mean", mutates_args=())
def _replica_mean_op(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    # Reached with no vmap level batching ``tensor``: one replica, its own mean.
    # (A custom op may not return its input, so this is a copy.)
    del group_size
    return tensor.clone()


@_replica_mean_op.register_fake
def _replica_mean_fake(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    del group_size
    return torch.empty_like(tensor)


def group_mean(stacked: torch.Tensor, group_size: int) -> torch.Tensor:
    """The mean over consecutive groups along dim 0, broadcast back to each member.

    ``stacked`` holds W replicas along dim 0; replica ``r`` belongs to group
    ``r // g``. Each replica's value is divided by ``g`` and the quotients are
    summed in replica order, the arithmetic of ``all_reduce_mean`` on gloo
    (divide, then sum), so the simulation matches a real world up to the
    order in which the collective adds. The result is a new contiguous tensor
    that shares no memory with ``stacked`` or between replicas.
    """
    num = stacked.shape[0]
    g = num if group_size == _ALL else group_size
    if g == 1:
        return stacked.clone()
    rest = stacked.shape[1:]
    grouped = stacked.reshape(num // g, g, *rest)
    mean = (grouped / g).sum(dim=1, keepdim=True)
    # expand + reshape is a copy when there are several groups and a stride-0
    # view when there is one: contiguous() makes every case a fresh tensor.
    return mean.expand(num // g, g, *rest).reshape(num, *rest).contiguous()


def check_group(group_size: int, num_replicas: int) -> None:
    """Raise ``ValueError`` unless ``group_size`` splits ``num_replicas`` replicas."""
    if num_replicas < 1:
        raise ValueError(
            f"replica_mean: the replica dimension has size {num_replicas}; it needs at least "
            "one replica"
        )
    if group_size != _ALL and num_replicas % group_size:
        raise ValueError(
            f"replica_mean: group_size {group_size} does not divide the number of replicas "
            f"W={num_replicas} (the size of the vmapped dimension)"
        )


@_replica_mean_op.register_vmap
def _replica_mean_vmap(
    info: Any, in_dims: tuple[Optional[int], Optional[int]], tensor: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, int]:
    # torch only calls this when ``tensor`` is batched at this level.
    check_group(group_size, info.batch_size)
    batch_dim = in_dims[0]
    assert batch_dim is not None  # torch calls a vmap rule only with a batched input
    stacked = tensor.movedim(batch_dim, 0)
    return group_mean(stacked, group_size), 0


class ReplicaMean:
    """A [`avgfn.Reduce`][avgfn.Reduce] over simulated replicas (see [`replica_mean()`][avgfn.simulate.replica_mean]).

    Attributes:
      group_size: replicas per group; ``None`` for all the replicas.
    """

    __slots__ = ("group_size",)

    def __init__(self, group_size: Optional[int] = None) -> None:
        self.group_size = group_size

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"replica_mean: expected a Tensor, got {type(tensor).__name__}")
        if not (tensor.is_floating_point() or tensor.is_complex()):
            raise TypeError(
                f"replica_mean: expected a floating-point or complex tensor, got {tensor.dtype}"
            )
        size = _ALL if self.group_size is None else self.group_size
        return _replica_mean_op(tensor, size)

    def __repr__(self) -> str:
        return f"replica_mean(group_size={self.group_size!r})"


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def replica_mean(group_size: Optional[int] = None) -> ReplicaMean:
    """The Reduce of simulated replicas: the mean over groups of the vmapped dimension.

    Inside ``torch.func.vmap`` over the replica dimension (of size W), each
    replica gets the mean over its group: replicas ``[0, g)``, ``[g, 2g)``, ...
    for ``group_size=g``, the consecutive ranks that ``dist.new_subgroups``
    groups on a real world. ``None`` averages all W replicas. Outside ``vmap``
    it is the Reduce of a group of one (it returns a copy of its input).

    Any ``in_dims``/``out_dims`` work: the replica dimension is the one ``vmap``
    maps, wherever it sits. Under nested ``vmap`` the mean is over the
    **innermost** ``vmap`` that maps the tensor: a level that does not map it
    (say, an inner ``vmap`` over data with ``in_dims=None`` for the params) is
    passed over, and the mean is taken over the next level out. Under
    ``torch.compile`` it traces into the graph (``fullgraph=True`` works).

    The arithmetic is that of ``avgfn.collectives.all_reduce_mean`` on gloo:
    each replica's value divided by ``g``, then summed (in replica order here;
    in gloo's order on a real world), so a simulated run matches a real one up
    to the rounding of the summation order.

    Args:
      group_size: replicas per group, ``>= 1``; it must divide W, which is
        checked when the Reduce runs under ``vmap``. ``None``: all replicas.

    Returns:
      A [`ReplicaMean`][avgfn.simulate.ReplicaMean], callable as ``reduce(tensor) -> tensor``.

    Raises:
      TypeError: a non-int ``group_size``.
      ValueError: ``group_size < 1``; when called, a ``group_size`` that does
        not divide W, or W == 0.

    Examples:
      >>> import torch, avgfn
      >>> from avgfn import simulate
      >>> stacked = {"w": torch.tensor([[0.0, 4.0], [2.0, 0.0], [4.0, 8.0], [6.0, 0.0]])}
      >>> mean_all, mean_pairs = simulate.replica_mean(), simulate.replica_mean(2)
      >>> torch.func.vmap(lambda p: avgfn.average(p, mean_all))(stacked)["w"]
      tensor([[3., 3.],
              [3., 3.],
              [3., 3.],
              [3., 3.]])
      >>> torch.func.vmap(lambda p: avgfn.average(p, mean_pairs))(stacked)["w"]
      tensor([[1., 2.],
              [1., 2.],
              [5., 4.],
              [5., 4.]])
      >>> mean_all(torch.tensor([1.0, 2.0]))      # outside vmap: a group of one
      tensor([1., 2.])
    """
    if group_size is not None:
        group_size = _check_size("group_size", group_size)
    return ReplicaMean(group_size)


PeriodGroupSizes = Union[Mapping[int, int], Sequence[tuple[int, int]]]


def hierarchy(
    period_group_sizes: PeriodGroupSizes, world_size: int
) -> list[tuple[int, ReplicaMean]]:
    """The simulated twin of [`avgfn.collectives.hierarchy()`][avgfn.collectives.hierarchy].

    Builds the levels of [`avgfn.hierarchical()`][avgfn.hierarchical] for ``world_size``
    replicas stacked under ``vmap``: a level of group size ``g`` averages over
    consecutive groups of ``g`` replicas, as ``dist.new_subgroups`` groups
    consecutive ranks; the last level averages over all ``world_size``. The
    checks are those of the real builder.

    Vmapping over ``k * world_size`` replicas runs ``k`` independent worlds of
    ``world_size`` side by side (every level's groups stay within a world).

    Args:
      period_group_sizes: ``period -> group size`` (a mapping, as torch's
        ``period_group_size_dict``, or ``(period, size)`` pairs), in strictly
        increasing period. The last size must be ``world_size``.
      world_size: the number of simulated replicas, ``>= 1``.

    Returns:
      ``[(period, reduce), ...]``, ready for [`avgfn.hierarchical()`][avgfn.hierarchical].

    Raises:
      ValueError: empty or non-increasing periods, a first period ``<= 0``, a
        size that does not divide ``world_size``, a last size other than
        ``world_size``, or ``world_size < 1``.
      TypeError: a non-int period or ``world_size``.

    Examples:
      >>> import torch, avgfn
      >>> from avgfn import simulate
      >>> levels = simulate.hierarchy({2: 2, 4: 4}, world_size=4)
      >>> [(period, reduce.group_size) for period, reduce in levels]
      [(2, 2), (4, 4)]
      >>> avg = avgfn.hierarchical(levels)
      >>> stacked = {"w": torch.tensor([[0.0], [2.0], [4.0], [6.0]])}
      >>> state = torch.func.vmap(avg.init)(stacked)
      >>> update = torch.func.vmap(avg.update, in_dims=(0, 0, None))
      >>> stacked, state = update(stacked, state, 2)     # pairs
      >>> stacked["w"].flatten().tolist()
      [1.0, 1.0, 5.0, 5.0]
      >>> stacked, state = update(stacked, state, 4)     # everyone
      >>> stacked["w"].flatten().tolist(), state.rounds.tolist()[0]
      ([3.0, 3.0, 3.0, 3.0], [1, 1])
    """
    world_size = _check_size("world_size", world_size)
    pairs = group_sizes(period_group_sizes, world_size, "world_size")
    return [(period, ReplicaMean(size)) for period, size in pairs]
