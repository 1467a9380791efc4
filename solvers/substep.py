"""Noise draws that do not end on a grid point: the intermediate stages of multi-stage SDE solvers
(docs/methods/stochastic_solvers_breadth.md).

The transition hook (:mod:`diffsample.solvers.transition`) is told the kernel of grid step ``i``
as ``(mean, std, grid, i)``: the draw starts at point ``i`` and lands at point ``i + 1``. A
single-step SDE solver with an intermediate stage (DPM-Solver++ SDE, SEEDS) also draws noise that
lands at an intermediate time ``t_s`` (between ``t_i`` and ``t_{i+1}``), and Restart sampling
draws a forward jump that *raises* the noise level. :func:`sample_substep` draws such a kernel
through the same hook, with a copy of the run's grid whose points ``i`` and ``i + 1`` are the
draw's actual start and landing times, so that

* a hook that evaluates candidates where the draw lands (SVDD) evaluates them at ``t_s``, and its
  cached evaluation is the one the solver asks for next;
* ``noise_fn(sigma, sigma_next)`` receives the draw's own noise levels (what a Brownian noise
  source needs);
* the step index ``i`` and the grid length stay those of the run (NoiseTilt's schedules).

:func:`from_pure_noise` is the first step from a point with ``alpha = 0`` (a rectified-flow grid
starting at ``t = 1``), where the VE sigma and the log-SNR of the multi-stage formulas are infinite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffsample.solvers.numerics import ancestral_split
from diffsample.solvers.solver import Grid, NoiseFn
from diffsample.solvers.transition import ancestral_noise, sample_kernel


def substep_grid(grid: Grid, i: int, t_from: float, t_to: float) -> Grid:
    """A copy of ``grid`` whose points ``i`` and ``i + 1`` are at times ``t_from`` and ``t_to``
    (schedule time units; ``t_to`` may be noisier than ``t_from`` for a forward jump).

    The copy is built without the monotonicity check of :meth:`Grid.from_t`: it only labels one
    draw and is never run as a grid.
    """
    ns = grid.noise_schedule
    pts = torch.tensor([t_from, t_to], dtype=torch.float64)
    t, alpha, sigma, lambda_ = grid.t.clone(), grid.alpha.clone(), grid.sigma.clone(), grid.lambda_.clone()
    t[i:i + 2] = pts
    alpha[i:i + 2], sigma[i:i + 2], lambda_[i:i + 2] = ns.alpha(pts), ns.sigma(pts), ns.lambda_(pts)
    return Grid(t=t, alpha=alpha, sigma=sigma, lambda_=lambda_, noise_schedule=ns)


def sample_substep(noise_fn: NoiseFn | None, solver: object, mean: Tensor, std: float, grid: Grid, i: int,
                   t_from: float, t_to: float) -> Tensor:
    """Draw ``x ~ N(mean, std^2 I)`` for a kernel of step ``i`` that starts at time ``t_from`` and
    lands at time ``t_to``, through the run's transition hook (see the module docstring).

    Raises:
        ValueError: ``noise_fn`` is ``None``.
    """
    if t_from == grid.t_list[i] and t_to == grid.t_list[i + 1]:
        return sample_kernel(noise_fn, solver, mean, std, grid, i)
    return sample_kernel(noise_fn, solver, mean, std, substep_grid(grid, i, t_from, t_to), i)


def point_at_lambda(grid: Grid, lambda_: float) -> tuple[float, float, float]:
    """``(t, alpha, sigma)`` of the grid's noise schedule at half log-SNR ``lambda_`` (an intermediate
    stage of a step)."""
    ns = grid.noise_schedule
    t = ns.t_from_lambda(torch.tensor(lambda_, dtype=torch.float64))
    return float(t), float(ns.alpha(t)), float(ns.sigma(t))


def from_pure_noise(solver: object, x: Tensor, denoised: Tensor, grid: Grid, i: int, eta: float,
                    noise_fn: NoiseFn | None, s_noise: float = 1.0) -> Tensor:
    """The ancestral Euler step (DDIM with noise ``eta``) from a point with ``alpha_i = 0``.

    With ``s = sigma / alpha`` infinite, ``x_{i+1} = alpha_{i+1} (D + s_down x_i / sigma_i) +
    alpha_{i+1} s_up z`` (the limit of :class:`~diffsample.solvers.euler.Euler`'s update), the
    draw through the transition hook.
    """
    alpha_next, sigma, sigma_next = grid.alpha_list[i + 1], grid.sigma_list[i], grid.sigma_list[i + 1]
    if sigma_next == 0.0:
        return alpha_next * denoised
    s_down, s_up = ancestral_split(math.inf, sigma_next / alpha_next, eta)
    mean = alpha_next * denoised + (alpha_next * s_down / sigma) * x
    return ancestral_noise(noise_fn, solver, mean, s_up, grid, i, s_noise)
