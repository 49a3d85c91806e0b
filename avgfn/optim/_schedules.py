"""Learning-rate schedules: pure functions of the step count, as in optax.

A schedule is called with the number of steps taken so far (a Python int or an
integer tensor, such as an optimizer state's ``step``) and returns the value as
a float64 tensor. Every schedule here is a closed form written with tensor
operations only (no ``.item()``, no Python branch on a tensor's value), so it
runs inside ``update`` under ``torch.func.vmap`` and ``torch.compile``.

The formulas are those of ``torch.optim.lr_scheduler``'s closed forms
(``_get_closed_form_lr``), written with the same floating-point operations in
the same order. torch's schedulers, stepped one step at a time, compute the
same values recursively (each value from the previous one), which rounds
differently: the two agree to about 1e-15 relative, not bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Protocol, Union

import torch

from avgfn._core.checks import check_int
from avgfn.optim._base import check_float


class Schedule(Protocol):
    """A value (typically a learning rate) as a function of the step count."""

    def __call__(self, count: Union[int, torch.Tensor], /) -> Union[torch.Tensor, float]:
        """Return the value for the step taken after ``count`` steps.

        Args:
          count: the steps taken so far, ``>= 0``: a Python int, or an integer
            tensor (0-d inside an optimizer's ``update``; a tensor of counts is
            evaluated elementwise).

        Returns:
          The value, a float64 tensor shaped like ``count`` (a user-written
          schedule may return a Python float instead).
        """
        ...


def as_count(count: Any, who: str) -> torch.Tensor:
    """``count`` as an int64 tensor; refuses floats, bools and negative ints."""
    if isinstance(count, torch.Tensor):
        if count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
            raise TypeError(f"{who}: count must be an integer tensor, got dtype {count.dtype}")
        return count.to(torch.int64)
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"{who}: count must be an int or an integer tensor, got {type(count).__name__}")
    if count < 0:
        raise ValueError(f"{who}: count must be >= 0, got {count}")
    return torch.tensor(int(count), dtype=torch.int64)


def check_lr(lr: Any) -> Union[float, Schedule]:
    """Validate an optimizer's ``lr``: a real number ``>= 0`` or a schedule."""
    if callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(
            "lr must be a real number or a schedule (a callable of the step count), "
            f"got {type(lr).__name__} {lr!r}"
        )
    return check_float("lr", lr)


def lr_at(lr: Union[float, Schedule], step: torch.Tensor) -> torch.Tensor:
    """The learning rate for the step after ``step`` steps, a float64 tensor.

    A float ``lr`` becomes a tensor on ``step``'s device; a schedule is called
    with ``step`` and its value must be a real scalar.
    """
    if not callable(lr):
        return torch.full_like(step, lr, dtype=torch.float64)
    value = lr(step)
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(
                f"the lr schedule returned a tensor of shape {tuple(value.shape)}; it must "
                "return a scalar (a 0-d tensor or a float) for a 0-d step count"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"the lr schedule returned a tensor of dtype {value.dtype}")
        return value.to(device=step.device, dtype=torch.float64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"the lr schedule returned {type(value).__name__} {value!r}; it must return a "
            "real number or a 0-d tensor"
        )
    return torch.full_like(step, float(value), dtype=torch.float64)


def _check_schedule(name: str, schedule: Any) -> Schedule:
    if not callable(schedule):
        raise TypeError(f"{name} must be a schedule (a callable of the step count), got {schedule!r}")
    return schedule


def constant_schedule(value: float) -> Schedule:
    """The same value at every step (``torch.optim.lr_scheduler.ConstantLR`` with factor 1).

    Args:
      value: the value, a real number ``>= 0``.

    Returns:
      A [`Schedule`][avgfn.optim.Schedule].

    Raises:
      TypeError: ``value`` is not a real number.
      ValueError: ``value`` is negative or NaN.

    Examples:
      >>> import torch, avgfn
      >>> schedule = avgfn.optim.constant_schedule(0.1)
      >>> schedule(0), schedule(torch.tensor([1, 1000]))
      (tensor(0.1000, dtype=torch.float64), tensor([0.1000, 0.1000], dtype=torch.float64))
    """
    value = check_float("value", value)

    def schedule(count: Union[int, torch.Tensor]) -> torch.Tensor:
        return torch.full_like(as_count(count, "constant_schedule"), value, dtype=torch.float64)

    return schedule


def linear_warmup(
    lr: float,
    warmup_steps: int,
    *,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
) -> Schedule:
    """``lr`` times a factor that moves linearly from ``start_factor`` to ``end_factor``.

    Reproduces ``torch.optim.lr_scheduler.LinearLR(optimizer, start_factor,
    end_factor, total_iters=warmup_steps)`` on an optimizer built with ``lr``:
    the value after ``t`` steps is
    ``lr * (start_factor + (end_factor - start_factor) * min(t, warmup_steps) / warmup_steps)``,
    and stays at ``lr * end_factor`` from step ``warmup_steps`` on.

    Args:
      lr: the base learning rate, ``>= 0``.
      warmup_steps: the number of steps over which the factor moves, ``>= 1``.
      start_factor: the factor at step 0, ``>= 0`` (torch requires ``> 0``).
      end_factor: the factor from step ``warmup_steps`` on, ``>= 0``.

    Returns:
      A [`Schedule`][avgfn.optim.Schedule].

    Raises:
      TypeError: an argument of the wrong type.
      ValueError: an argument out of range.

    Examples:
      >>> import torch, avgfn
      >>> warmup = avgfn.optim.linear_warmup(0.1, 3, start_factor=0.25)
      >>> warmup(torch.arange(6))
      tensor([0.0250, 0.0500, 0.0750, 0.1000, 0.1000, 0.1000], dtype=torch.float64)
    """
    lr = check_float("lr", lr)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
    start_factor = check_float("start_factor", start_factor)
    end_factor = check_float("end_factor", end_factor)
    delta = end_factor - start_factor
    total = float(warmup_steps)

    def schedule(count: Union[int, torch.Tensor]) -> torch.Tensor:
        t = torch.clamp(as_count(count, "linear_warmup"), 0, warmup_steps).to(torch.float64)
        # torch: base_lr * (start + (end - start) * min(total_iters, t) / total_iters)
        progress = torch.div(torch.mul(t, delta), torch.full_like(t, total))
        return torch.mul(torch.add(progress, start_factor), lr)

    return schedule


def _cosine(lr: float, decay_steps: int, eta_min: float) -> Schedule:
    amplitude = lr - eta_min
    total = float(decay_steps)

    def schedule(count: Union[int, torch.Tensor]) -> torch.Tensor:
        t = torch.clamp(as_count(count, "cosine_decay"), 0, decay_steps).to(torch.float64)
        # torch: eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2
        angle = torch.div(torch.mul(t, math.pi), torch.full_like(t, total))
        half = torch.div(torch.mul(torch.add(torch.cos(angle), 1.0), amplitude), 2.0)
        return torch.add(half, eta_min)

    return schedule


def cosine_decay(
    lr: float,
    decay_steps: int,
    *,
    eta_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_factor: float = 1.0 / 3,
) -> Schedule:
    """Cosine annealing from ``lr`` to ``eta_min``, after an optional linear warm-up.

    Without warm-up, reproduces ``torch.optim.lr_scheduler.CosineAnnealingLR(
    optimizer, T_max=decay_steps, eta_min=eta_min)``: after ``t`` steps the
    value is ``eta_min + (lr - eta_min) * (1 + cos(pi * t / decay_steps)) / 2``.
    With ``warmup_steps > 0``, reproduces ``SequentialLR(optimizer,
    [LinearLR(optimizer, warmup_start_factor, 1.0, total_iters=warmup_steps),
    CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=eta_min)],
    milestones=[warmup_steps])``: [`linear_warmup()`][avgfn.optim.linear_warmup] for the first
    ``warmup_steps`` steps, then the cosine, counted from 0.

    After the cosine's ``decay_steps`` steps the value stays at ``eta_min``
    (as optax's ``cosine_decay_schedule`` does); torch's ``CosineAnnealingLR``
    instead rises again, with period ``2 * T_max``.

    Args:
      lr: the peak learning rate, ``>= 0``.
      decay_steps: the length of the cosine, ``>= 1`` (torch's ``T_max``).
      eta_min: the final value, ``>= 0``.
      warmup_steps: the length of the linear warm-up, ``>= 0``.
      warmup_start_factor: the warm-up's first value as a fraction of ``lr``,
        ``>= 0`` (``LinearLR``'s ``start_factor``).

    Returns:
      A [`Schedule`][avgfn.optim.Schedule].

    Raises:
      TypeError: an argument of the wrong type.
      ValueError: an argument out of range.

    Examples:
      >>> import torch, avgfn
      >>> schedule = avgfn.optim.cosine_decay(1.0, 4, warmup_steps=2, warmup_start_factor=0.5)
      >>> schedule(torch.arange(8))
      tensor([0.5000, 0.7500, 1.0000, 0.8536, 0.5000, 0.1464, 0.0000, 0.0000],
             dtype=torch.float64)
    """
    lr = check_float("lr", lr)
    decay_steps = check_int("decay_steps", decay_steps, minimum=1)
    eta_min = check_float("eta_min", eta_min)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    warmup_start_factor = check_float("warmup_start_factor", warmup_start_factor)
    cosine = _cosine(lr, decay_steps, eta_min)
    if warmup_steps == 0:
        return cosine
    warmup = linear_warmup(lr, warmup_steps, start_factor=warmup_start_factor, end_factor=1.0)
    return join_schedules([warmup, cosine], [warmup_steps])


def step_decay(lr: float, step_size: int, *, gamma: float = 0.1) -> Schedule:
    """``lr`` multiplied by ``gamma`` once every ``step_size`` steps.

    Reproduces ``torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)``
    on an optimizer built with ``lr``: after ``t`` steps the value is
    ``lr * gamma ** (t // step_size)``.

    Args:
      lr: the initial learning rate, ``>= 0``.
      step_size: the number of steps between two decays, ``>= 1``.
      gamma: the factor of each decay, ``>= 0``.

    Returns:
      A [`Schedule`][avgfn.optim.Schedule].

    Raises:
      TypeError: an argument of the wrong type.
      ValueError: an argument out of range.

    Examples:
      >>> import torch, avgfn
      >>> schedule = avgfn.optim.step_decay(1.0, 2, gamma=0.5)
      >>> schedule(torch.arange(7))
      tensor([1.0000, 1.0000, 0.5000, 0.5000, 0.2500, 0.2500, 0.1250],
             dtype=torch.float64)
    """
    lr = check_float("lr", lr)
    step_size = check_int("step_size", step_size, minimum=1)
    gamma = check_float("gamma", gamma)

    def schedule(count: Union[int, torch.Tensor]) -> torch.Tensor:
        t = torch.clamp(as_count(count, "step_decay"), min=0)
        decays = torch.div(t, step_size, rounding_mode="floor").to(torch.float64)
        # torch: base_lr * gamma ** (t // step_size)
        return torch.mul(torch.pow(torch.full_like(decays, gamma), decays), lr)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules`` one after another, each counting its steps from 0.

    ``schedules[0]`` gives the values before ``boundaries[0]``; ``schedules[i]``
    gives the value at step ``t`` in ``[boundaries[i-1], boundaries[i])`` as
    ``schedules[i](t - boundaries[i-1])``. This is
    ``torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers,
    milestones=boundaries)`` and optax's ``join_schedules``.

    Every schedule is evaluated at every step (with its count clamped at 0)
    and the value is chosen with ``torch.where``, so the choice works on a
    tensor count under ``torch.func.vmap``.

    Args:
      schedules: the schedules, at least one.
      boundaries: ``len(schedules) - 1`` strictly increasing step counts, each ``>= 1``.

    Returns:
      A [`Schedule`][avgfn.optim.Schedule].

    Raises:
      TypeError: a schedule that is not callable, or a boundary that is not an integer.
      ValueError: the wrong number of boundaries, or boundaries not increasing.

    Examples:
      >>> import torch, avgfn
      >>> warmup = avgfn.optim.linear_warmup(1.0, 2, start_factor=0.5)
      >>> decay = avgfn.optim.step_decay(1.0, 1, gamma=0.5)
      >>> avgfn.optim.join_schedules([warmup, decay], [2])(torch.arange(5))
      tensor([0.5000, 0.7500, 1.0000, 0.5000, 0.2500], dtype=torch.float64)
    """
    if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence):
        raise TypeError(f"schedules must be a sequence of schedules, got {type(schedules).__name__}")
    schedules = [_check_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules)]
    if not schedules:
        raise ValueError("schedules must hold at least one schedule")
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise TypeError(f"boundaries must be a sequence of ints, got {type(boundaries).__name__}")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must hold len(schedules) - 1 = {len(schedules) - 1} step counts, "
            f"got {len(boundaries)}"
        )
    bounds = [check_int(f"boundaries[{i}]", b, minimum=1) for i, b in enumerate(boundaries)]
    for i in range(1, len(bounds)):
        if bounds[i] <= bounds[i - 1]:
            raise ValueError(f"boundaries must be strictly increasing, got {bounds}")
    first, rest = schedules[0], list(zip(bounds, schedules[1:]))

    def schedule(count: Union[int, torch.Tensor]) -> torch.Tensor:
        t = as_count(count, "join_schedules")
        value = torch.as_tensor(first(t), dtype=torch.float64, device=t.device)
        for boundary, later in rest:
            shifted = torch.clamp(torch.sub(t, boundary), min=0)
            later_value = torch.as_tensor(later(shifted), dtype=torch.float64, device=t.device)
            value = torch.where(torch.ge(t, boundary), later_value, value)
        return value

    return schedule
