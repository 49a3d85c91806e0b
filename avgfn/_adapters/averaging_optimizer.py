"""A ``torch.optim.Optimizer`` wrapper: torch's ``PostLocalSGDOptimizer`` on avgfn.

It owns the one step counter of the algorithm (`AveragingOptimizer.iteration`),
which [`avgfn.collectives.ddp_comm_hook()`][avgfn.collectives.ddp_comm_hook] can read too, and its
``state_dict`` carries the averager's state, so a checkpoint restores the
whole algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch

from avgfn._core.types import Averager
from avgfn._core.checks import check_int
from avgfn._adapters.module import LiveAverager, ParamPolicy, check_param_policy

_KEY = "avgfn"


class AveragingOptimizer(torch.optim.Optimizer):
    """Wrap a ``torch.optim.Optimizer``: step it, then average the params when due.

    The equivalent of torch's ``PostLocalSGDOptimizer(optim, averager)``:
    `step()` runs ``optimizer.step()`` and then the averaging due at
    `iteration` (the 0-based index of this step), and advances
    `iteration` by one. With ``avgfn.periodic`` or ``avgfn.hierarchical``
    (or [`avgfn.post_local_sgd()`][avgfn.post_local_sgd]'s averager) it reproduces torch's
    ``PeriodicModelAverager`` / ``HierarchicalModelAverager`` bit for bit.

    As torch's wrapper does, it averages only the parameters that have a
    gradient (``p.grad is not None``): a [`avgfn.ModuleAverager`][avgfn.ModuleAverager] does so by
    default (its own ``params=``), and so does a plain Averager here
    (``params="with_grad"``); ``params="all"`` averages every parameter.

    If the averaging raises (an [`avgfn.PeerError`][avgfn.PeerError], a
    [`avgfn.NonFiniteError`][avgfn.NonFiniteError]...), the inner step stays applied, and the
    averager's state and `iteration` are those from before the call: the
    averaging of that iteration is owed. The next `step()` re-attempts only
    it (it neither steps the inner optimizer, nor calls ``closure`` or
    ``scaler``, nor reads the gradients: the parameters left out are those
    of the failed call, even after a ``zero_grad()``), then advances
    `iteration`, so a retry that succeeds ends where a run without the
    failure ends. With ``scaler=``, a retry hands the scaler back the inf
    checks of the inner step it applied when an ``update()`` used them up
    since, so a ``scaler.update()`` after the retry (say, in a ``finally``)
    does not raise; that step then counts twice in the scaler's growth and
    back-off (call ``update()`` only after a ``step()`` that returned to
    count it once). While an
    averaging is owed, `state_dict()` raises ``RuntimeError`` (a run resumed
    from it would apply that inner step twice); a `load_state_dict()` of an
    earlier checkpoint drops it.

    Differences from torch's wrapper:

    * [`state_dict()`][avgfn.state_dict] stores the averager's whole state and the counter
      under the key ``"avgfn"``, and [`load_state_dict()`][avgfn.load_state_dict] is strict: a
      checkpoint without it, from another inner optimizer class or from
      another averaging algorithm raises ``ValueError`` and changes nothing
      (torch's warns and restarts its counter at 0).
    * ``step(scaler=grad_scaler)`` supports ``torch.amp.GradScaler``: the
      scaler unscales and checks the inner optimizer, skips the inner step if
      it found an inf or NaN, and the averaging due at this iteration happens
      anyway, so every replica keeps the same schedule (with torch's wrapper,
      ``scaler.step(opt)`` skips the averaging too and its counter stops while
      the DDP hook's counter runs on: pytorch/pytorch#76282). Call
      ``scaler.unscale_(opt.optimizer)`` (the inner optimizer) if you clip.

    Args:
      optimizer: the local optimizer.
      averager: an [`avgfn.ModuleAverager`][avgfn.ModuleAverager] (averages a module's
        parameters, with a buffer policy), or a plain [`avgfn.Averager`][avgfn.Averager],
        which then averages the parameters of ``optimizer.param_groups`` in
        group order, as torch's wrapper does.
      params: with a plain Averager, ``"with_grad"`` (the default: only the
        parameters that have a gradient, torch's filter) or ``"all"``. With a
        ModuleAverager, leave it out and pass it to the ModuleAverager.

    Attributes:
      optimizer: the wrapped optimizer.
      averager: the [`avgfn.ModuleAverager`][avgfn.ModuleAverager] (or equivalent) it drives.
      iteration: the index of the next `step()` (the number of steps taken).

    Examples:
      >>> import torch, avgfn
      >>> model = torch.nn.Linear(2, 1)
      >>> avg = avgfn.ModuleAverager(model, avgfn.periodic(4, reduce=lambda t: t, warmup_steps=2))
      >>> opt = avgfn.AveragingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), avg)
      >>> for _ in range(7):
      ...     opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step()
      >>> opt.iteration, int(avg.state.rounds)      # averaged at iterations 2 and 6
      (7, 2)
      >>> sorted(opt.state_dict()["avgfn"])
      ['averager', 'iteration', 'optimizer']
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        averager: Union[LiveAverager, Averager],
        *,
        params: Optional[ParamPolicy] = None,
    ) -> None:
        # Like torch's PostLocalSGDOptimizer, this does not call
        # Optimizer.__init__: it shares the inner optimizer's param_groups and state.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(averager, Averager):
            averager = LiveAverager(
                lambda: [list(group["params"]) for group in optimizer.param_groups],
                averager,
                name="param_groups",
                params=check_param_policy("with_grad" if params is None else params),
            )
        elif not isinstance(averager, LiveAverager):
            raise TypeError(
                "averager must be an avgfn.ModuleAverager or an avgfn.Averager, "
                f"got {type(averager).__name__}"
            )
        elif params is not None:
            raise ValueError(
                f"params={params!r} applies to a plain Averager; with a ModuleAverager, "
                f"pass params= to the ModuleAverager (this one has params={averager.params!r})"
            )
        self.optimizer = optimizer
        self.averager = averager
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.iteration = 0
        # (what the inner step returned, the tensors its averaging leaves out, the
        # scaler's inf checks of it) while the averaging of `iteration` is owed
        self._owed: Optional[tuple[Any, Optional[list[torch.Tensor]], Any]] = None

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's per-parameter state."""
        return self.optimizer.state

    def __repr__(self) -> str:
        return f"AveragingOptimizer({self.optimizer!r}, {self.averager!r}, iteration={self.iteration})"

    def step(  # type: ignore[override]
        self, closure: Optional[Callable[[], float]] = None, *, scaler: Any = None
    ) -> Optional[float]:
        """Run the inner step, then the averaging due at `iteration`; advance it.

        After a call whose averaging raised, the next call only re-attempts
        that averaging (see the class docstring): the inner step is applied
        once.

        Args:
          closure: passed to the inner ``optimizer.step`` (not with ``scaler``).
          scaler: a ``torch.amp.GradScaler``: the inner step goes through
            ``scaler.step(self.optimizer)``, which skips it when the gradients
            hold an inf or NaN; the averaging and the counter advance anyway.
            Call ``scaler.update()`` afterwards, as usual.

        Returns:
          What the inner step returned.

        Raises:
          Exception: what the averaging raised (the averaging is then owed
            and the next call retries it).
        """
        if scaler is not None and closure is not None:
            raise ValueError("step: a closure cannot be combined with scaler=")
        if self._owed is not None:  # the inner step of this iteration is already applied
            loss, left_out, inf_checks = self._owed
            if scaler is not None:
                _restore_inf_checks(scaler, self.optimizer, inf_checks)
        else:
            if scaler is None:
                loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
            else:
                loss = scaler.step(self.optimizer)
            inf_checks = _inf_checks(scaler, self.optimizer)
            self._owed = (loss, None, inf_checks)  # owed from here on, even if the warning below raises
            left_out = self.averager.left_out_at(self.iteration)
            self._owed = (loss, left_out, inf_checks)
        self.averager.step(self.iteration, left_out=left_out)
        self._owed = None
        self.iteration += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict`` plus an ``"avgfn"`` entry.

        The entry holds the step counter, the inner optimizer's class name and
        the averager's state; everything loads with
        ``torch.load(..., weights_only=True)``.

        Raises:
          RuntimeError: the averaging of `iteration` raised and is owed
            (retry `step()` first, or load an earlier checkpoint).
        """
        if self._owed is not None:
            raise RuntimeError(
                f"state_dict: the averaging of iteration {self.iteration} raised after its inner "
                "step, and is owed; a run resumed from a checkpoint taken now would apply that "
                "inner step twice. Call step() to retry the averaging (only it runs), or "
                "load_state_dict() an earlier checkpoint"
            )
        out = self.optimizer.state_dict()
        out[_KEY] = {
            "iteration": self.iteration,
            "optimizer": type(self.optimizer).__qualname__,
            "averager": self.averager.state_dict(),
        }
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a [`state_dict()`][avgfn.state_dict]: strict, and all or nothing.

        Raises:
          ValueError: no ``"avgfn"`` entry (a plain optimizer's or torch's
            ``PostLocalSGDOptimizer``'s checkpoint), another inner optimizer
            class, another averaging algorithm, or what the inner
            ``load_state_dict`` refuses (other param groups). Nothing is
            modified when it raises.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        ours = state_dict.get(_KEY)
        if not isinstance(ours, Mapping):
            raise ValueError(
                f"load_state_dict: the checkpoint has no {_KEY!r} entry, so it was not saved by "
                "AveragingOptimizer.state_dict (a plain optimizer's or torch's "
                "PostLocalSGDOptimizer's checkpoint?); refusing to restart the averaging schedule"
            )
        if set(ours) != {"iteration", "optimizer", "averager"}:
            raise ValueError(
                f"load_state_dict: the {_KEY!r} entry must have keys ['averager', 'iteration', "
                f"'optimizer'], got {sorted(map(str, ours))}"
            )
        expected = type(self.optimizer).__qualname__
        if ours["optimizer"] != expected:
            raise ValueError(
                f"load_state_dict: the checkpoint was saved around a {ours['optimizer']!r} "
                f"optimizer, this one wraps a {expected!r}"
            )
        iteration = check_int("the checkpoint's iteration", ours["iteration"], minimum=0)
        averager_state = self.averager.loaded_state(ours["averager"])
        inner = {k: v for k, v in state_dict.items() if k != _KEY}
        self.optimizer.load_state_dict(inner)
        self.averager.state = averager_state
        self.iteration = iteration
        self._owed = None


def _inf_checks(scaler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """A copy of what ``scaler.step(optimizer)`` recorded (``None`` without a scaler).

    torch's ``GradScaler.update()`` refuses to run without the inf checks of
    a step; a retry that does not step again hands these back. Read from the
    scaler's per-optimizer record, a private attribute of
    ``torch.amp.GradScaler``; another scaler gets nothing back.
    """
    record = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(record, dict) or id(optimizer) not in record:
        return None
    return dict(record[id(optimizer)])


def _restore_inf_checks(scaler: Any, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Give ``scaler`` back the inf checks of the retried step, unless it still holds them."""
    record = getattr(scaler, "_per_optimizer_states", None)
    if saved is None or not isinstance(record, dict):
        return
    if record.get(id(optimizer), {}).get("found_inf_per_device"):
        return  # no update() since the failed call: the checks are still there
    record[id(optimizer)] = dict(saved)
