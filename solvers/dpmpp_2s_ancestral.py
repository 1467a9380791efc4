"""DPM-Solver++(2S) with ancestral noise (k-diffusion ``sample_dpmpp_2s_ancestral``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.substep import from_pure_noise, point_at_lambda
from diffsample.solvers.transition import AncestralEtaNoise, ancestral_noise, ancestral_split_at


@dataclass(frozen=True)
class DPMSolverPP2SAncestral(AncestralEtaNoise):
    r"""Single-step DPM-Solver++(2S) (Lu et al. 2022, arXiv 2211.01095, Algorithm 1 with r = 1/2) to
    ``sigma_down``, then fresh noise ``sigma_up`` (k-diffusion ``sample_dpmpp_2s_ancestral``).

    In VE coordinates (``x~ = x / alpha``, ``s = sigma / alpha``), with ``(s_down, s_up)`` =
    ``ancestral_split(s_i, s_{i+1}, eta)`` (k-diffusion ``get_ancestral_step``) and
    ``s_mid = sqrt(s_i s_down)`` (the lambda midpoint):

    ``u~ = (s_mid / s_i) x~_i + (1 - s_mid / s_i) D(x_i, s_i)``
    ``x~_{i+1} = (s_down / s_i) x~_i + (1 - s_down / s_i) D(u, s_mid) + s_noise s_up z``

    and ``x_{i+1} = alpha_{i+1} x~_{i+1}``. When ``s_down = 0`` (the step to ``sigma = 0``) the step
    is ``x~_{i+1} = D(x_i, s_i)`` (1 call). The noise goes through
    :func:`~diffsample.solvers.transition.sample_kernel` (kernel std ``alpha_{i+1} s_noise s_up``).

    * ``eta = 0``: deterministic DPM-Solver++(2S); order 2, 2 calls per step.
    * ``eta = 1`` (default): ancestral; the first-order DDPM noise split, so the stochastic method
      is weakly first order.

    A step from ``alpha = 0`` (rectified flow at ``t = 1``) is the ancestral Euler step (1 call).

    ``s_noise = 0`` with ``eta > 0`` keeps the ancestral split without its noise: deterministic but
    not the ODE (biased marginals, no convergence order); the noise-free limit is ``eta = 0``.

    Raises:
        ValueError: ``eta < 0`` or ``s_noise < 0``.
    """

    @property
    def order(self) -> int:
        return 2

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def nfe(self, grid: Grid) -> int:
        splits = (ancestral_split_at(grid, i, self.eta) for i in range(grid.steps))
        return sum(1 if (math.isinf(s) or s_down == 0.0) else 2 for s, s_down, _ in splits)

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        alpha, alpha_next = grid.alpha_list[i], grid.alpha_list[i + 1]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        s, s_down, s_up = ancestral_split_at(grid, i, self.eta)
        if math.isinf(s):
            return from_pure_noise(self, x, denoised, grid, i, self.eta, noise_fn, self.s_noise), None
        if s_down == 0.0:
            x_next = alpha_next * denoised
        else:
            lambda_mid = -0.5 * (math.log(s) + math.log(s_down))
            s_mid = math.exp(-lambda_mid)
            t_mid, alpha_mid, _ = point_at_lambda(grid, lambda_mid)
            u = (alpha_mid * s_mid / (s * alpha)) * x + (alpha_mid * (1.0 - s_mid / s)) * denoised
            denoised_2 = call_denoise(denoise, u, t_mid)
            x_next = (alpha_next * s_down / (s * alpha)) * x + (alpha_next * (1.0 - s_down / s)) * denoised_2
        return ancestral_noise(noise_fn, self, x_next, s_up, grid, i, self.s_noise), None
