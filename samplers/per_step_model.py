"""A per-step model selector: one network (or adapter) per grid point, for step-decoupled students.

A step-decoupled student (Z-Image Turbo++, arXiv 2606.12575) has one parameter set per sampling
step: step ``i`` of its grid is taken with network ``i``. :class:`PerStepModel` is a ``Denoiser``
that holds one denoiser per grid point and routes each row of a call to the denoiser of the grid
point its time ``t`` equals, so every solver, guidance term and loop hook works on it unchanged
(CFG's two branches, reward gradients and SVDD candidates are rows at the same ``t``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffsample.guidance.term import Cond, Denoiser
from diffsample.solvers.solver import Grid

TIME_TOLERANCE = 1e-3
"""Largest ``|t - t_i|`` (in the noise schedule's time unit) at which a row counts as grid point ``i``."""


def _times(t: Sequence[float] | Tensor) -> list[float]:
    return [float(v) for v in (t.tolist() if isinstance(t, Tensor) else t)]


class PerStepModel:
    """Denoiser that evaluates ``denoisers[i]`` at grid time ``t[i]``.

    Args:
        denoisers: one ``Denoiser`` per evaluation point of the grid, noisiest first; all on the
            same noise schedule.
        t: the evaluation times of the grid (``grid.t[:steps]``: the final ``sigma = 0`` point is
            never evaluated), shape ``(steps,)``, strictly decreasing, in the noise schedule's time.

    Call as ``model(x, t, cond)`` with ``x`` of shape ``(B, *dims)`` and ``t`` of shape ``(B,)``; rows
    at different grid points are routed to their own denoisers. Model evaluations are counted by
    the wrapped denoisers (one per row, as for a single network).

    Raises:
        ValueError: at construction, an empty list, a list whose length is not the number of grid
            points, times that are not strictly decreasing, or denoisers on different noise
            schedules; at call time, a ``t`` that is not one of the grid's times (the student was
            asked for a step its grid cannot give).
    """

    def __init__(self, denoisers: Sequence[Denoiser], t: Sequence[float] | Tensor) -> None:
        denoisers, times = list(denoisers), _times(t)
        if not denoisers:
            raise ValueError("PerStepModel needs at least one denoiser (one per grid point)")
        if len(denoisers) != len(times):
            raise ValueError(f"per-step model list has {len(denoisers)} denoisers for a grid of {len(times)} "
                             f"evaluation points {times}; give exactly one per point")
        if any(b >= a for a, b in zip(times, times[1:])):
            raise ValueError(f"per-step model times must be strictly decreasing (noisiest first), got {times}")
        schedule = denoisers[0].noise_schedule
        if any(d.noise_schedule is not schedule for d in denoisers[1:]):
            raise ValueError("per-step model denoisers must share one noise schedule object")
        self.denoisers = tuple(denoisers)
        self.t = tuple(times)
        self.noise_schedule = schedule

    @classmethod
    def on_grid(cls, denoisers: Sequence[Denoiser], grid: Grid) -> "PerStepModel":
        """One denoiser per step of ``grid`` (its ``grid.steps`` evaluation points).

        Raises:
            ValueError: ``len(denoisers) != grid.steps`` (one line naming both), as the constructor.
        """
        if len(denoisers) != grid.steps:
            raise ValueError(f"per-step model list has {len(denoisers)} denoisers for a grid of {grid.steps} steps "
                             f"(times {[round(v, 3) for v in grid.t_list[:grid.steps]]}); give exactly one per step")
        return cls(denoisers, grid.t_list[:grid.steps])

    def index(self, t: Tensor) -> Tensor:
        """The grid index of every row's time, shape ``(B,)`` int64.

        Raises:
            ValueError: a time that is no grid point (naming it and the grid's times).
        """
        grid_t = torch.tensor(self.t, dtype=torch.float64, device=t.device)
        dist = (t.to(torch.float64).reshape(-1, 1) - grid_t.reshape(1, -1)).abs()
        best, idx = dist.min(dim=1)
        if (best > TIME_TOLERANCE).any():
            bad = float(t.reshape(-1)[int(best.argmax())])
            raise ValueError(f"per-step model evaluated at t={bad:g}, which is not one of its grid times "
                             f"{[round(v, 3) for v in self.t]}; sample on that grid ({len(self.t)} steps)")
        return idx

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        idx = self.index(t)
        first = int(idx[0])
        if bool((idx == first).all()):
            return self.denoisers[first](x, t, cond)
        out = torch.empty_like(x)
        for k in idx.unique().tolist():
            rows = idx == k
            out[rows] = self.denoisers[k](x[rows], t[rows], _rows(cond, rows))
        return out


def _rows(cond: Cond | None, rows: Tensor) -> Cond | None:
    """``cond`` restricted to the batch rows ``rows`` (tensor keyword arguments with a batch axis)."""
    if cond is None:
        return None
    n = rows.shape[0]
    return cond.map(lambda v: v[rows] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v)
