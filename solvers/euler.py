"""Euler / DDIM, deterministic or ancestral."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.transition import AncestralEta, ancestral_noise, ancestral_split_at


@dataclass(frozen=True)
class Euler(AncestralEta):
    r"""Euler step of the probability-flow ODE in VE coordinates ``(x / alpha, sigma / alpha)``.

    With ``s = sigma / alpha`` and ``D`` the denoiser output at ``x_i``:

    ``x_{i+1} / alpha_{i+1} = D + (s_down / s_i) (x_i / alpha_i - D) + s_up z``

    where ``(s_down, s_up)`` = k-diffusion ``get_ancestral_step(s_i, s_{i+1}, eta)``.

    * ``eta = 0``: deterministic; identical to DDIM (Song et al. 2020, arXiv 2010.02502 eq. 12) and
      to DPM-Solver++(1) (arXiv 2211.01095 eq. 8), and for rectified flow to the flow-matching Euler
      step ``x + (t_{i+1} - t_i) v``. Order 1.
    * ``eta = 1``: ancestral sampling, the DDPM posterior step (Ho et al. 2020, arXiv 2006.11239);
      ``eta`` matches DDIM's eta exactly. Consumes ``noise_fn`` through
      :func:`~diffsample.solvers.transition.sample_kernel` (kernel std ``alpha_{i+1} s_up``).

    Stages: 1 denoiser call per step. Not to be confused with the Euler-Maruyama step of the
    reverse SDE.

    Raises:
        ValueError: ``eta < 0``.
    """

    @property
    def order(self) -> int:
        return 1

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        alpha, alpha_next, sigma = grid.alpha_list[i], grid.alpha_list[i + 1], grid.sigma_list[i]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        _, s_down, s_up = ancestral_split_at(grid, i, self.eta)  # s = inf on a flow grid's t = 1 (alpha = 0)
        # Deterministic move to s_down along the tangent through denoised (ratio = s_down / s).
        ratio = s_down * alpha / sigma
        x_next = (alpha_next * s_down / sigma) * x + (alpha_next * (1.0 - ratio)) * denoised
        # Fresh noise for the rest of the way to s_next.
        return ancestral_noise(noise_fn, self, x_next, s_up, grid, i), None
