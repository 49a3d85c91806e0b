"""Fakes for unit tests: Reduces that record, answer as peers would, or fail.

These let a user test a training loop that uses avgfn without any process
group: the averagers only ever call the Reduce they were given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import torch

__all__ = ["RecordingReduce", "peers_mean", "raising_reduce"]

Peer = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class RecordingReduce:
    """A Reduce that counts its calls and keeps copies of what it was handed.

    Args:
      fn: computes the answer from the (copied) input; ``None`` answers the
        input itself, the Reduce of a group of one.

    Attributes:
      calls: how many times it was called.
      inputs: a copy of each tensor it was handed, in call order.
      outputs: what it answered, in call order.

    Examples:
      >>> import torch, avgfn
      >>> reduce = avgfn.testing.RecordingReduce(lambda t: t * 0)
      >>> avgfn.average({"a": torch.ones(2), "b": torch.ones(1)}, reduce)
      {'a': tensor([0., 0.]), 'b': tensor([0.])}
      >>> reduce.calls, reduce.inputs[0]
      (1, tensor([1., 1., 1.]))
    """

    def __init__(self, fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.fn = fn
        self.calls = 0
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs.append(tensor.detach().clone())
        result = tensor if self.fn is None else self.fn(tensor)
        self.outputs.append(result)
        return result

    def __repr__(self) -> str:
        return f"RecordingReduce(calls={self.calls})"


def peers_mean(*peers: Peer, rank: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Reduce that answers as if the group also held the peers' values.

    Each peer is either a tensor (that peer's flat buffer, shaped like the
    input) or a callable computing that peer's buffer from ours (for example
    ``lambda t: t + 1``). The answer is computed as torch's averaging does it:
    every member's buffer divided by the group size, then summed in rank order.

    Args:
      *peers: the other members of the group.
      rank: the position of the caller among the ``len(peers) + 1`` members.

    Returns:
      A Reduce.

    Examples:
      >>> import torch, avgfn
      >>> reduce = avgfn.testing.peers_mean(lambda t: t + 2.0, torch.zeros(2))
      >>> reduce(torch.tensor([3.0, 6.0]))
      tensor([2.6667, 4.6667])
    """
    size = len(peers) + 1
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
    for peer in peers:
        if not isinstance(peer, torch.Tensor) and not callable(peer):
            raise TypeError(f"peers must be tensors or callables, got {peer!r}")

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        values = []
        for peer in peers:
            value = peer(tensor) if callable(peer) else peer
            if value.shape != tensor.shape:
                raise ValueError(
                    f"peers_mean: a peer's buffer has shape {tuple(value.shape)}, the input "
                    f"{tuple(tensor.shape)}"
                )
            values.append(value.to(tensor.dtype))
        values.insert(rank, tensor)
        total = values[0] / size
        for value in values[1:]:
            total = total + value / size
        return total

    return reduce


def raising_reduce(
    error: Optional[BaseException] = None, *, after: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Reduce that scribbles over its argument, then raises (a peer died mid-round).

    Args:
      error: the exception to raise (default: ``RuntimeError``).
      after: how many calls succeed (answering their input) before it raises.

    Examples:
      >>> import torch, avgfn
      >>> params = {"w": torch.ones(2)}
      >>> try:
      ...     avgfn.average(params, avgfn.testing.raising_reduce())
      ... except RuntimeError as e:
      ...     print(e, params["w"])
      fake reduce failure tensor([1., 1.])
    """
    calls = [0]

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] <= after:
            return tensor
        tensor.fill_(float("nan"))
        raise error if error is not None else RuntimeError("fake reduce failure")

    return reduce
