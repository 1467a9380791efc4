"""DPM-Solver++ SDE, the single-step stochastic sampler of k-diffusion (``sample_dpmpp_sde``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from diffsample.solvers.numerics import ancestral_split
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.substep import from_pure_noise, point_at_lambda, sample_substep
from diffsample.solvers.transition import AncestralEtaNoise, sample_kernel

NOISE_COUPLINGS = ("brownian", "independent")


@dataclass(frozen=True)
class DPMSolverPPSDE(AncestralEtaNoise):
    r"""DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``; the single-step second-order
    DPM-Solver++ of arXiv 2211.01095 with ancestral noise on both stages).

    In VE coordinates (``x~ = x / alpha``, ``s = sigma / alpha``, ``lambda = -log s``), with
    ``h = lambda_{i+1} - lambda_i``, the stage point ``lambda_s = lambda_i + r h`` (``s_s``),
    ``(d_1, u_1) = ancestral_split(s_i, s_s, eta)``, ``(d_2, u_2) = ancestral_split(s_i, s_{i+1}, eta)``
    and ``D = D(x_i, s_i)``:

    ``u~ = (d_1 / s_i) x~_i + (1 - d_1 / s_i) D + s_noise u_1 z_1``              (at ``s_s``)
    ``D_r = (1 - 1/(2r)) D + 1/(2r) D(u, s_s)``
    ``x~_{i+1} = (d_2 / s_i) x~_i + (1 - d_2 / s_i) D_r + s_noise u_2 z_2``

    and ``x = alpha x~``. The step to ``sigma = 0`` is ``x~ = D`` (1 call); every other step makes 2
    calls. A step from ``alpha = 0`` (rectified flow at ``t = 1``) is the ancestral Euler step.

    Noise: k-diffusion draws ``z_1`` and ``z_2`` from a Brownian tree in the VE sigma: they are the
    normalised increments of one Brownian motion over ``[s_s, s_i]`` and ``[s_{i+1}, s_i]``, with
    correlation ``c = sqrt((s_i - s_s) / (s_i - s_{i+1}))``. Here every draw is a fresh standard
    normal through the transition hook (so NoiseTilt / SVDD act on it). ``noise="brownian"``
    (default) keeps k-diffusion's law: ``z_2 = c z_1 + sqrt(1 - c^2) z'`` with ``z_1`` the realised
    standardised draw of the first stage and ``z'`` the fresh draw, so the second kernel has std
    ``alpha_{i+1} s_noise u_2 sqrt(1 - c^2)``. ``noise="independent"`` draws ``z_2`` independently
    (the law of k-diffusion with its default Gaussian noise sampler instead of the tree). Neither
    reproduces the tree's *values* for a seed (the tree is not a per-step Gaussian stream).

    * ``eta = 0``: deterministic DPM-Solver++(2S) with stage ``r`` (order 2, 2 calls per step).
    * ``eta = 1`` (default): stochastic, weakly first order.

    ``s_noise = 0`` with ``eta > 0`` keeps the ancestral split without its noise: deterministic but
    not the ODE (biased marginals, no convergence order); the noise-free limit is ``eta = 0``.

    Raises:
        ValueError: ``eta < 0``, ``s_noise < 0``, ``r`` outside ``(0, 1]`` or an unknown ``noise``.
    """

    r: float = 0.5
    noise: Literal["brownian", "independent"] = "brownian"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.r <= 1:
            raise ValueError(f"r must be in (0, 1], got {self.r}")
        if self.noise not in NOISE_COUPLINGS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_COUPLINGS)}; got {self.noise!r}")

    @property
    def order(self) -> int:
        return 2

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def nfe(self, grid: Grid) -> int:
        return sum(1 if (grid.alpha_list[i] == 0.0 or grid.sigma_list[i + 1] == 0.0) else 2 for i in range(grid.steps))

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        alpha, alpha_next = grid.alpha_list[i], grid.alpha_list[i + 1]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        if alpha == 0.0:
            return from_pure_noise(self, x, denoised, grid, i, self.eta, noise_fn, self.s_noise), None
        if grid.sigma_list[i + 1] == 0.0:
            return alpha_next * denoised, None
        s, s_next = grid.sigma_list[i] / alpha, grid.sigma_list[i + 1] / alpha_next
        lambda_, h = grid.lambda_list[i], grid.lambda_list[i + 1] - grid.lambda_list[i]
        x_ve = x / alpha
        # Stage 1: to lambda_i + r h, with noise.
        t_s, alpha_s, _ = point_at_lambda(grid, lambda_ + self.r * h)
        s_s = math.exp(-(lambda_ + self.r * h))
        d_1, u_1 = ancestral_split(s, s_s, self.eta)
        mean_1 = (alpha_s * d_1 / s) * x_ve + (alpha_s * (1.0 - d_1 / s)) * denoised
        std_1 = alpha_s * self.s_noise * u_1
        u = sample_substep(noise_fn, self, mean_1, std_1, grid, i, grid.t_list[i], t_s) if std_1 > 0 else mean_1
        denoised_2 = call_denoise(denoise, u, t_s)
        # Stage 2: to lambda_{i+1} with the stage-weighted denoised.
        fac = 1.0 / (2.0 * self.r)
        d_2, u_2 = ancestral_split(s, s_next, self.eta)
        denoised_r = (1.0 - fac) * denoised + fac * denoised_2
        x_next = (alpha_next * d_2 / s) * x_ve + (alpha_next * (1.0 - d_2 / s)) * denoised_r
        std_2 = alpha_next * self.s_noise * u_2
        if std_2 <= 0:
            return x_next, None
        if self.noise == "brownian" and std_1 > 0:
            c = math.sqrt((s - s_s) / (s - s_next))
            x_next = x_next + (std_2 * c / std_1) * (u - mean_1)
            std_2 = std_2 * math.sqrt(1.0 - c * c)
        return sample_kernel(noise_fn, self, x_next, std_2, grid, i), None
