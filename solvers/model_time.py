"""Decoupled model-evaluation times: the solver steps on grid times ``t_i``, the model is asked at ``t'_i``.

LD3 (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", arXiv 2405.15506; its official
code, ``discretize_model_wrapper`` and the solvers' ``timesteps2``) learns two sequences: the grid
``t_i`` on which the solver's exponential-integrator / multistep arithmetic runs, and the time
``t'_i`` handed to the network at each grid point, within a window around ``t_i``. The network's
output at ``(x_i, t'_i)`` is used as the denoised value at grid point ``i``. A small shift corrects
the systematic error of a coarse step (the same idea as timestep alignment, arXiv 2310.09469).

:class:`ModelTimeMap` is that map. At the grid's own times it returns the stored ``t'_i`` exactly
(matched to a relative 1e-6, so float32 time tensors match); anywhere else (the intermediate stage
of a single-step solver) it shifts ``log(sigma / alpha)`` by the offset interpolated linearly
between the neighbouring grid points (held constant beyond the ends).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseSchedule

_MATCH_RTOL = 1e-6


class ModelTimeMap:
    """``t -> t'``: where the model is evaluated when a solver asks at ``t``.

    Args:
        t: ``(N,)`` the grid's evaluation times (noisiest first), in the noise schedule's time unit.
        t_model: ``(N,)`` the model-evaluation time at each of them (same unit, inside
            ``[t_min, t_max]``).
        noise_schedule: the process (for the log-sigma interpolation away from the grid's times).

    Raises:
        ValueError: different lengths, empty or non-finite times, model times outside the range.
    """

    def __init__(self, t: Sequence[float], t_model: Sequence[float], noise_schedule: NoiseSchedule) -> None:
        t, t_model = [float(v) for v in t], [float(v) for v in t_model]
        if not t or len(t) != len(t_model):
            raise ValueError(f"model times must give one time per grid time: {len(t_model)} for {len(t)}")
        if not all(math.isfinite(v) for v in t + t_model):
            raise ValueError(f"grid and model times must be finite, got {t} and {t_model}")
        lo, hi = noise_schedule.t_min, noise_schedule.t_max
        tol = 1e-9 * max(1.0, abs(hi))
        outside = [v for v in t_model if v < lo - tol or v > hi + tol]
        if outside:
            raise ValueError(f"model times {outside} leave the noise schedule's range [{lo}, {hi}]")
        self.t, self.t_model, self.noise_schedule = tuple(t), tuple(min(max(v, lo), hi) for v in t_model), noise_schedule
        u = self._u(torch.tensor(t, dtype=torch.float64))
        u_model = self._u(torch.tensor(self.t_model, dtype=torch.float64))
        finite = torch.isfinite(u) & torch.isfinite(u_model)
        order = torch.argsort(u[finite])
        self._knots_u = u[finite][order].numpy()
        self._knots_offset = (u_model - u)[finite][order].numpy()

    def _u(self, t: Tensor) -> Tensor:
        return torch.log(self.noise_schedule.sigma_ve(t))

    @property
    def identity(self) -> bool:
        """Whether every model time is its grid time."""
        return self.t == self.t_model

    def __call__(self, t: Tensor) -> Tensor:
        """The model times for the query times ``t`` (any shape; same shape, dtype and device)."""
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        out = torch.empty_like(flat)
        todo = torch.ones_like(flat, dtype=torch.bool)
        for a, b in zip(self.t, self.t_model):
            hit = todo & ((flat - a).abs() <= _MATCH_RTOL * max(1.0, abs(a)))
            out[hit] = b
            todo &= ~hit
        if todo.any():
            q = flat[todo]
            u = self._u(q)
            ok = torch.isfinite(u)
            shifted = q.clone()
            if ok.any() and self._knots_u.size:
                off = np.interp(u[ok].numpy(), self._knots_u, self._knots_offset)
                moved = self.noise_schedule.t_from_sigma_ve(torch.exp(u[ok] + torch.from_numpy(off)))
                shifted[ok] = moved.clamp(self.noise_schedule.t_min, self.noise_schedule.t_max)
            out[todo] = shifted
        return out.reshape(t.shape).to(device=t.device, dtype=t.dtype)

    def wrap(self, denoise: Any) -> Any:
        """``denoise`` (``(x, t, *rest) -> denoised``) evaluated at the model times."""

        def warped(x: Tensor, t: Tensor, *rest: Any) -> Tensor:
            return denoise(x, self(t), *rest)

        return warped

    def __repr__(self) -> str:
        return f"ModelTimeMap(t={list(self.t)}, t_model={list(self.t_model)})"


def model_time_map(step_schedule: Any, grid: Grid) -> ModelTimeMap | None:
    """The :class:`ModelTimeMap` of a step schedule that carries decoupled model times (its
    ``t_model`` attribute, e.g. an LD3 :class:`~diffsample.solvers.schedule_file.OptimizedSchedule`
    fitted with ``decoupled=True``) on the run's ``grid``; ``None`` for an ordinary schedule.

    Raises:
        ValueError: the grid's evaluation times are not the schedule's own times (a truncated or
            otherwise changed grid), so the model times have nothing to attach to.
    """
    t_model = getattr(step_schedule, "t_model", None)
    if not t_model:
        return None
    t_sched = tuple(float(v) for v in getattr(step_schedule, "t", ()))
    n = grid.steps if grid.final_zero else grid.steps + 1
    t_grid = grid.t_list[:n]
    if len(t_sched) != len(t_grid) or any(abs(a - b) > 1e-9 * max(1.0, abs(a)) for a, b in zip(t_sched, t_grid)):
        raise ValueError(f"schedule {step_schedule} evaluates the model at decoupled times fitted to its own grid "
                         f"{list(t_sched)}; this run's grid is {list(t_grid)} (truncated or changed), which they do "
                         "not fit")
    return ModelTimeMap(t_sched, t_model, grid.noise_schedule)


@dataclass(frozen=True)
class WithModelTimes:
    """A step schedule with decoupled model times attached (e.g. a pipeline's fixed copy of an LD3
    schedule's grid): ``__call__`` is ``schedule``'s; ``t`` are the grid times the model times
    belong to (what :func:`model_time_map` matches the run's grid against)."""

    schedule: Callable[[NoiseSchedule, int], Tensor]
    t: tuple[float, ...]
    t_model: tuple[float, ...]

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        return self.schedule(ns, n)

    def __str__(self) -> str:
        return f"{self.schedule} (decoupled model times)"
