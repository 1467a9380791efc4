"""DPM2: k-diffusion's DPM-Solver-2-style midpoint step in VE sigma, deterministic or ancestral."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffsample.solvers._ve_multistep import eps_of
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.transition import AncestralEta, ancestral_noise, ancestral_split_at


@dataclass(frozen=True)
class DPM2(AncestralEta):
    r"""k-diffusion's DPM2 (``sample_dpm_2``, "inspired by DPM-Solver-2 and Algorithm 2 from Karras et
    al. (2022)", arXiv 2206.00927 / 2206.00364) and its ancestral form (``sample_dpm_2_ancestral``).

    In VE coordinates ``y = x / alpha``, ``s = sigma / alpha``, slope ``d = (y - D) / s``, with
    ``(s_down, s_up) = ancestral_split(s_i, s_{i+1}, eta)``:

    ``s_mid = sqrt(s_i s_down)`` (the midpoint in log sigma),
    ``y_mid = y_i + (s_mid - s_i) d_i``,  ``y_down = y_i + (s_down - s_i) d(y_mid, s_mid)``,
    ``x_{i+1} = alpha_{i+1} y_down + alpha_{i+1} s_up z``  (``eta > 0`` only, through
    :func:`~diffsample.solvers.transition.sample_kernel`).

    A step with ``s_down = 0`` (the step to ``sigma = 0``) is the Euler step ``x = D``, with one
    denoiser call; so is a step from ``alpha = 0`` (a flow grid starting at ``t = 1``, where the
    midpoint is undefined). ``eta = 0`` is ``dpm_2``, ``eta = 1`` ``dpm_2_ancestral``; without churn.
    The midpoint's time is ``noise_schedule.t_from_sigma_ve(s_mid)``.

    Checked against k-diffusion ``sample_dpm_2`` / ``sample_dpm_2_ancestral`` (transcribed, MIT) on
    the exact Gaussian mixture to 1e-9 (tests/solvers/test_breadth_crosscheck.py).

    Stages: 2 denoiser calls per step (1 on the step to ``sigma = 0``). Deterministic order 2.

    Raises:
        ValueError: ``eta < 0``.
    """

    @property
    def order(self) -> int:
        return 2

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def nfe(self, grid: Grid) -> int:
        single = sum(1 for i in range(grid.steps) if grid.sigma_list[i + 1] == 0.0 or grid.alpha_list[i] == 0.0)
        return 2 * grid.steps - single

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        alpha, sigma = grid.alpha_list[i], grid.sigma_list[i]
        alpha_next, sigma_next = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        d = eps_of(x, denoised, alpha, sigma)
        s, s_down, s_up = ancestral_split_at(grid, i, self.eta)
        if s_down == 0.0 or sigma_next == 0.0 or alpha == 0.0:
            mean = alpha_next * (denoised + s_down * d)
        else:
            s_mid = math.exp(0.5 * (math.log(s) + math.log(s_down)))
            ns = grid.noise_schedule
            t_mid = float(ns.t_from_sigma_ve(torch.tensor([s_mid], dtype=torch.float64)))
            alpha_mid = float(ns.alpha(torch.tensor([t_mid], dtype=torch.float64)))
            y_mid = denoised + s_mid * d
            d_mid = (y_mid - call_denoise(denoise, alpha_mid * y_mid, t_mid)) / s_mid
            mean = alpha_next * (x / alpha + (s_down - s) * d_mid)
        return ancestral_noise(noise_fn, self, mean, s_up, grid, i), None
