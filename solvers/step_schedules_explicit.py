"""Explicit step lists for every solver: ``sigmas:values=[...]`` and ``timesteps:values=[...]``.

* :class:`Sigmas` -- the model sigmas of the grid, noisiest first, as ComfyUI's ``SIGMAS``,
  k-diffusion's ``sigmas`` and diffusers' ``set_timesteps(sigmas=...)`` take them: the VE sigma
  ``sigma / alpha`` on VP / VE processes, the flow time ``t`` on rectified flow
  (:func:`~diffsample.solvers.step_schedules_sigma.t_from_model_sigmas`). A trailing ``0`` (the
  clean end, as in ComfyUI's and k-diffusion's lists) is allowed and dropped.
* :class:`Timesteps` -- the times in the noise schedule's own unit (the diffusers timestep on
  ``DiscreteVP``; diffusers ``set_timesteps(timesteps=...)``, e.g. the AYS timestep lists).

``values`` is a sequence of numbers or the text of a list (``"14.6,6.0,2.0,0.5,0"``; the CLI's
``--schedule "sigmas:values=[14.6,6.0,2.0,0.5,0]"``). The list fixes the number of points: with
``final="zero"`` (the default) a run takes ``steps`` = the number of nonzero sigmas (or of
timesteps) and denoises to 0 after the last; with ``final="last"`` it stops at the last one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.step_schedules import check_steps
from diffsample.solvers.step_schedules_sigma import t_from_model_sigmas


def parse_values(values: "str | Sequence[float]", what: str) -> tuple[float, ...]:
    """``values`` as a tuple of finite floats: a sequence of numbers, or text with ``,`` / ``;`` /
    spaces between numbers (optionally bracketed).

    Raises:
        ValueError: no values, or an entry that is not a finite number (the message names it).
    """
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        items = [values]
    elif isinstance(values, str):
        text = values.strip().strip("[]()")
        items = [v for v in text.replace(";", ",").replace(" ", ",").split(",") if v.strip()]
    else:
        try:
            items = list(values)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"{what}: values must be a list of numbers, got {values!r}") from None
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: values must be numbers, got {item!r}") from None
        if isinstance(item, bool) or not math.isfinite(number):
            raise ValueError(f"{what}: values must be finite numbers, got {item!r}")
        out.append(number)
    if not out:
        raise ValueError(f"{what}: values is empty; give at least one, e.g. {what}:values=[14.6,2.0,0]")
    return tuple(out)


def _check_decreasing(values: tuple[float, ...], what: str) -> None:
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what}: values must be strictly decreasing (noisiest first), got {list(values)}")


def _check_count(given: int, n: int, what: str) -> None:
    if n != given:
        raise ValueError(f"{what} has {given} points, cannot produce {n}; run it with steps={given} (final='zero') "
                         f"or steps={given - 1} (final='last')")


@dataclass(frozen=True)
class Sigmas:
    """Explicit model sigmas, noisiest first (module docstring).

    Args:
        values: strictly decreasing sigmas > 0, optionally ending in one 0.

    Raises:
        ValueError: an empty or non-numeric list, values not strictly decreasing, a 0 or negative
            value other than a final 0; when called for a number of points other than the list's.
    """

    values: tuple[float, ...]

    def __init__(self, values: "str | Sequence[float]") -> None:
        parsed = parse_values(values, "sigmas")
        if len(parsed) > 1 and parsed[-1] == 0:
            parsed = parsed[:-1]
        _check_decreasing(parsed, "sigmas")
        if parsed[-1] <= 0:
            raise ValueError(f"sigmas: values must be > 0 except a final 0, got {list(parsed)}")
        object.__setattr__(self, "values", parsed)

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        _check_count(len(self.values), n, "sigmas list")
        return t_from_model_sigmas(ns, torch.tensor(self.values, dtype=torch.float64), "sigmas")


@dataclass(frozen=True)
class Timesteps:
    """Explicit times in the noise schedule's unit, noisiest first (module docstring).

    Args:
        values: strictly decreasing times inside ``[t_min, t_max]`` of the noise schedule.

    Raises:
        ValueError: an empty or non-numeric list, values not strictly decreasing; when called for
            a number of points other than the list's, or with a time outside the schedule's range.
    """

    values: tuple[float, ...]

    def __init__(self, values: "str | Sequence[float]") -> None:
        parsed = parse_values(values, "timesteps")
        _check_decreasing(parsed, "timesteps")
        object.__setattr__(self, "values", parsed)

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        _check_count(len(self.values), n, "timesteps list")
        if self.values[0] > ns.t_max or self.values[-1] < ns.t_min:
            raise ValueError(f"timesteps {list(self.values)} leave the noise schedule's range [{ns.t_min:g}, {ns.t_max:g}]")
        return torch.tensor(self.values, dtype=torch.float64)
