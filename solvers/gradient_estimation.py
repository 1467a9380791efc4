"""Gradient estimation: Euler with a momentum-like correction from the previous slope."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from diffsample.solvers._ve_multistep import eps_of
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise


@dataclass(frozen=True)
class GradientEstimation:
    r"""Gradient-estimation sampler (Permenter & Yuan 2023, "Interpreting and Improving Diffusion
    Models from an Optimization Perspective", arXiv 2306.04848, Algorithm 2), in the form of
    ComfyUI's ``sample_gradient_estimation``.

    In VE coordinates ``y = x / alpha``, ``s = sigma / alpha``, slope ``d = (y - D) / s``:

    ``y_{i+1} = y_i + (s_{i+1} - s_i) (d_i + (gamma - 1) (d_i - d_{i-1}))``

    (the first step has no correction; the step to ``sigma = 0`` is ``x = D``). ``gamma = 2`` is the
    paper's and ComfyUI's default; ``gamma = 1`` is Euler; ``gamma = 1.5`` is the two-step
    Adams-Bashforth weight pair (3/2, -1/2) of a uniform grid. For ``gamma != 1.5`` the correction is
    ``O(h)`` per step and the method is first order (measured, tests/solvers/test_order.py).

    ComfyUI's code is GPL-3 and not used: the test checks this update against the formula above
    written out independently. Stages: 1 denoiser call per step. Deterministic.

    Raises:
        ValueError: ``gamma`` not finite.
    """

    gamma: float = 2.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be a finite number, got {self.gamma!r}")

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, x: Tensor, grid: Grid) -> Tensor | None:
        return None

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: Tensor | None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, Tensor]:
        alpha, sigma = grid.alpha_list[i], grid.sigma_list[i]
        alpha_next, sigma_next = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        d = eps_of(x, denoised, alpha, sigma)
        if sigma_next == 0.0:
            return alpha_next * denoised, d
        s_next = sigma_next / alpha_next
        y = denoised + s_next * d
        if state is not None:
            y = y + ((s_next - sigma / alpha) * (self.gamma - 1.0)) * (d - state)
        return alpha_next * y, d
