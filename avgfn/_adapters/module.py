"""Driving a pure averager against a live ``nn.Module``: avgfn's one impure edge.

Everything else in avgfn returns new tensors. [`ModuleAverager`][avgfn.ModuleAverager] is where
those new values are written back into a module's own parameters (and,
if asked, buffers), in place, so that the optimizer, DDP and any other
holder of a reference to those tensors sees them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ContextManager, Literal, Optional, cast

import torch

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._core.types import Averager
from avgfn._core.checks import check_step
from avgfn._checkpoint import load_state_dict, state_dict

BufferPolicy = Literal["local", "average", "ignore"]
_POLICIES = ("local", "average", "ignore")
ParamPolicy = Literal["with_grad", "all"]
PARAM_POLICIES = ("with_grad", "all")


def check_param_policy(params: Any) -> ParamPolicy:
    """Validate a ``params=`` argument of the adapters."""
    if not isinstance(params, str) or params not in PARAM_POLICIES:
        raise ValueError(
            f"params must be one of {list(PARAM_POLICIES)} (\"with_grad\": torch's filter, only "
            f"the parameters that have a gradient; \"all\": every one), got {params!r}"
        )
    return cast(ParamPolicy, params)


class LiveAverager:
    """Drives an [`avgfn.Averager`][avgfn.Averager] over live tensors, writing results in place.

    The base of [`ModuleAverager`][avgfn.ModuleAverager]; [`avgfn.AveragingOptimizer`][avgfn.AveragingOptimizer] also
    uses it directly over an optimizer's ``param_groups``.

    Args:
      tensors: called at each step, returns the pytree of live tensors to
        average (the same structure every time).
      averager: the pure averager.
      name: what to call the target in error messages.
      params: ``"with_grad"`` (default): at each step the averager's
        selection leaves out the parameters whose ``.grad`` is ``None``, as
        torch's averagers do (at ``init``, before any backward pass, those
        with ``requires_grad=False``); ``"all"``: nothing is left out.
      parameters: called at each step, returns the tensors that ``params``
        applies to (default: every tensor of ``tensors()``).

    Attributes:
      averager: the pure averager.
      params: the ``params`` policy.
      state: the averager's current state (replaced, never mutated, at each step).
    """

    def __init__(
        self,
        tensors: Callable[[], Any],
        averager: Averager,
        *,
        name: str = "params",
        params: ParamPolicy = "with_grad",
        parameters: Optional[Callable[[], Iterable[torch.Tensor]]] = None,
    ) -> None:
        if not isinstance(averager, Averager):
            raise TypeError(f"averager must be an avgfn.Averager, got {type(averager).__name__}")
        self.params = check_param_policy(params)
        self._tensors = tensors
        self._parameters = parameters or (
            lambda: [t for t in _tree.tree_leaves(tensors()) if isinstance(t, torch.Tensor)]
        )
        self._name = name
        self._warned = False
        self.averager = averager
        with self._leaving_out(at_init=True):
            self.state = averager.init(tensors())

    def _leaving_out(self, at_init: bool, left_out: Optional[list[torch.Tensor]] = None) -> ContextManager[None]:
        """The block in which the averager's selections honour ``params``.

        ``"with_grad"`` leaves out, at a step, the parameters without a
        gradient (torch's filter) and, at ``init``, those that require none
        (before the first backward pass no parameter has one; an averager
        that keeps a copy of what it averages, as DiLoCo does, copies the
        trainable ones). ``left_out`` replaces what a step would read now.
        """
        if left_out is None:
            left_out = self.left_out_now(at_init)
        return contextlib.nullcontext() if left_out is None else _select.left_out(left_out)

    def left_out_now(self, at_init: bool = False) -> Optional[list[torch.Tensor]]:
        """The tensors that ``params`` leaves out of a round taken now (``None``: nothing).

        With ``"with_grad"``, the parameters whose ``.grad`` is ``None`` (at
        ``init``: those with ``requires_grad=False``). Read it before
        ``zero_grad()`` to replay a step later with `step()`'s ``left_out``.
        """
        if self.params == "all":
            return None
        if at_init:
            return [t for t in self._parameters() if not t.requires_grad]
        return [t for t in self._parameters() if t.grad is None]

    def left_out_at(self, step: int) -> Optional[list[torch.Tensor]]:
        """`left_out_now()` for a round at ``step``; warns once if no trainable parameter has a gradient."""
        left_out = self.left_out_now()
        if left_out is not None:
            self._warn_if_nothing_has_a_grad(left_out, step)
        return left_out

    def _warn_if_nothing_has_a_grad(self, left_out: list[torch.Tensor], step: int) -> None:
        if self._warned or not left_out:
            return
        trainable = (t for t in self._parameters() if t.requires_grad)
        first = next(trainable, None)  # stops at the first trainable parameter with a gradient
        if first is not None and first.grad is None and all(t.grad is None for t in trainable):
            self._warned = True
            warnings.warn(
                f"{type(self).__name__}(params='with_grad') at step {step}: no parameter has a "
                "gradient, so torch's filter leaves every parameter out of the averaging (was "
                "zero_grad() called before step()?). Call step() after the backward pass and "
                "the optimizer step, before zero_grad(); or pass params='all'",
                UserWarning,
                stacklevel=4,
            )

    def step(self, step: int, *, left_out: Optional[list[torch.Tensor]] = None) -> bool:
        """Average the live tensors if averaging is due at ``step``; write them in place.

        The averaging itself is the pure ``averager.update``; only if it
        succeeds are the averaged values copied into the live tensors (under
        ``torch.no_grad``, with ``Tensor.copy_``, so every reference to them,
        the optimizer's included, sees the new values and keeps its storage).
        If the Reduce raises, nothing is written and the state is unchanged.
        With ``params="with_grad"``, the parameters whose ``.grad`` is
        ``None`` are left out of the round, as torch's averagers leave them;
        when no trainable parameter has a gradient (``zero_grad()`` before
        ``step()``), it warns once.

        Args:
          step: the 0-based training iteration.
          left_out: the tensors to leave out instead of what ``params`` reads
            now (a list that `left_out_now()` returned earlier: a retry of a
            failed step after ``zero_grad()`` keeps that step's selection).

        Returns:
          Whether a round averaged the live tensors at this step, a round
          that wrote its average into them (``avgfn.Round(donate=True)``)
          included.
        """
        step = check_step(step)
        tree = self._tensors()
        if left_out is None:
            left_out = self.left_out_at(step)
        with torch.no_grad(), self._leaving_out(at_init=False, left_out=left_out):
            new_tree, new_state = self.averager.update(tree, self.state, step)
            changed = False
            if new_tree is not tree:
                for old, new in zip(_tree.tree_leaves(tree), _tree.tree_leaves(new_tree)):
                    if new is not old:
                        old.copy_(new)
                        changed = True
                # A donated round writes the average into the tensors it was
                # handed and returns those same tensors, in a new tree and with
                # a new state: the live tensors already hold the average. (An
                # off-step returns its inputs themselves, so it costs only the
                # identity test above.)
                changed = changed or new_state is not self.state
        self.state = new_state
        return changed

    def state_dict(self) -> dict[str, Any]:
        """The averager's state as a flat dict (see [`avgfn.state_dict()`][avgfn.state_dict]), tagged with its type."""
        return {"state_type": type(self.state).__qualname__, "state": state_dict(self.state)}

    def loaded_state(self, checkpoint: Mapping[str, Any]) -> Any:
        """Validate ``checkpoint`` and return the state it holds, changing nothing."""
        if not isinstance(checkpoint, Mapping) or set(checkpoint) != {"state_type", "state"}:
            raise ValueError(
                "load_state_dict: expected the dict that state_dict() returns, with keys "
                f"['state', 'state_type'], got {_keys(checkpoint)}"
            )
        expected = type(self.state).__qualname__
        if checkpoint["state_type"] != expected:
            raise ValueError(
                f"load_state_dict: the checkpoint holds a {checkpoint['state_type']} (another "
                f"averaging algorithm), this averager's state is a {expected}"
            )
        return load_state_dict(self.state, checkpoint["state"])

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore the state saved by [`state_dict()`][avgfn.state_dict]; strict, and all or nothing."""
        self.state = self.loaded_state(checkpoint)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name}, state={type(self.state).__name__})"


def _keys(obj: Any) -> Any:
    return sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__


class ModuleAverager(LiveAverager):
    """Drive an [`avgfn.Averager`][avgfn.Averager] against a live ``nn.Module``, in place.

    This is avgfn's one impure edge: `step()` runs the pure
    ``averager.update`` on the module's own parameter tensors
    (``dict(module.named_parameters())``, so a ``where`` tree or the param
    order follow ``named_parameters``) and copies the averaged values back into
    them with ``Tensor.copy_`` under ``torch.no_grad``. torch's averagers
    rebind ``param.data`` to a view of the communication buffer instead; the
    values are the same, and ``copy_`` keeps each parameter's storage (DDP's
    bucket views and tied weights stay intact).

    Parameters follow ``params``:

    * ``"with_grad"`` (default, torch's filter): at each step only the
      parameters that have a gradient (``p.grad is not None``) are averaged,
      as with torch's ``PostLocalSGDOptimizer`` and model averagers; a frozen
      parameter, or one that no backward pass reached, keeps its own value.
      Among those, the averager's ``where`` still decides. Replicas that
      differ in which parameters have a gradient all raise
      [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] before any value moves (the
      per-round check of a group-backed Reduce). An averager that keeps a
      copy of what it averages (the DiLoCo family) copies, at construction,
      the parameters with ``requires_grad=True``, and each of them must have
      a gradient at every synchronization.
    * ``"all"``: every parameter the averager's ``where`` selects (by
      default every floating-point one), gradient or not: the behaviour of
      the averager called on ``dict(module.named_parameters())``.

    Buffers (BatchNorm running statistics and the like) follow ``buffers``:

    * ``"local"`` (default, what torch's averagers do): never averaged, each
      replica keeps its own. Refused for a DDP-wrapped module that broadcasts
      its buffers (``broadcast_buffers=True``), which would overwrite them
      with rank 0's at every forward: wrap with ``broadcast_buffers=False``
      or pass the inner module.
    * ``"average"``: averaged together with the parameters, in the same
      Reduce calls (``where`` still decides; by default every floating-point
      buffer, so ``num_batches_tracked`` stays local).
    * ``"ignore"``: avgfn neither averages nor checks them; whatever else
      manages them (DDP's broadcast, your code) is in charge.

    Args:
      module: the model (an ``nn.Module``; a DDP wrapper works too).
      averager: the pure averager, e.g. ``avgfn.periodic(...)`` or the
        ``.averager`` of [`avgfn.post_local_sgd()`][avgfn.post_local_sgd].
      buffers: ``"local"``, ``"average"`` or ``"ignore"``.
      params: ``"with_grad"`` or ``"all"``.

    Examples:
      >>> import torch, avgfn
      >>> model = torch.nn.Linear(2, 1)
      >>> model(torch.ones(1, 2)).sum().backward()          # params without a .grad are left out
      >>> peer = avgfn.testing.peers_mean(lambda t: t * 0)   # a peer whose params are all 0
      >>> avg = avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=peer))
      >>> before = model.weight.detach().clone()
      >>> avg.step(0), avg.step(1)
      (True, False)
      >>> torch.equal(model.weight, before / 2)
      True
    """

    def __init__(
        self,
        module: torch.nn.Module,
        averager: Averager,
        *,
        buffers: BufferPolicy = "local",
        params: ParamPolicy = "with_grad",
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if buffers not in _POLICIES:
            raise ValueError(f"buffers must be one of {list(_POLICIES)}, got {buffers!r}")
        if (
            buffers == "local"
            and getattr(module, "broadcast_buffers", False) is True
            and any(True for _ in module.buffers())
        ):
            raise ValueError(
                'buffers="local" but the module broadcasts its buffers from rank 0 at every '
                "forward (DDP with broadcast_buffers=True); wrap it with "
                'broadcast_buffers=False, pass the inner module, or use buffers="ignore"'
            )
        self.module = module
        self.buffers = buffers
        super().__init__(
            self._live, averager, name=type(module).__name__, params=params, parameters=module.parameters
        )

    def _live(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = dict(self.module.named_parameters())
        if self.buffers == "average":
            tensors.update(self.module.named_buffers())
        return tensors

    def __repr__(self) -> str:
        return (
            f"ModuleAverager({type(self.module).__name__}, buffers={self.buffers!r}, "
            f"params={self.params!r}, state={type(self.state).__name__})"
        )
