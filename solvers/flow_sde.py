"""Euler-Maruyama step of the rectified-flow SDE with the flow's marginals (Flow-GRPO form)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.noise_schedules import RectifiedFlow
from diffsample.solvers.transition import sample_kernel


@dataclass(frozen=True)
class FlowSDE:
    r"""Reverse SDE of a rectified flow ``x_t = (1 - t) x0 + t eps`` with diffusion ``g_t`` and the
    flow ODE's marginals (docs/methods/stochastic_steps.md; Flow-GRPO, arXiv 2505.05470, eq. 9;
    Psi-Sampler's ``step``). With ``h = t_i - t_{i+1}``, velocity ``u = (x - D) / t`` and score
    ``s = -(x - (1 - t) D) / t^2``:

    ``x_{i+1} = x - h u + (g^2 h / 2) s + g sqrt(h) z``,  ``g = noise_level * sqrt(t / (1 - t))``

    (at ``t = 1``, where ``g`` is infinite, ``t_{i+1}`` is used in ``g``, as Flow-GRPO does). The
    step to ``t = 0`` is ``x = D``. ``noise_level = 0`` is the flow-matching Euler step. Order 1
    (weak); 1 NFE per step; consumes ``noise_fn`` through
    :func:`~diffsample.solvers.transition.sample_kernel`, so NoiseTilt / SVDD act on it.

    Raises:
        ValueError: ``noise_level < 0``; at run time, a noise schedule that is not ``RectifiedFlow``.
    """

    noise_level: float = 0.7

    def __post_init__(self) -> None:
        if not self.noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return self.noise_level > 0

    def init(self, x: Tensor, grid: Grid) -> None:
        if not isinstance(grid.noise_schedule, RectifiedFlow):
            raise ValueError(f"flow_sde needs a RectifiedFlow noise schedule, got {type(grid.noise_schedule).__name__}; "
                             "for VP / VE models use euler_ancestral or dpmpp_2m_sde")
        return None

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def step(self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None,
             noise_fn: NoiseFn | None = None) -> tuple[Tensor, None]:
        t, t_next = grid.t_list[i], grid.t_list[i + 1]
        denoised = call_denoise(denoise, x, t)
        if t_next == 0.0:
            return denoised, None
        h = t - t_next
        u = (x - denoised) / t
        t_g = t if t < 1.0 else t_next
        g2 = self.noise_level**2 * t_g / (1.0 - t_g)
        mean = x - h * u - (0.5 * g2 * h / t**2) * (x - (1.0 - t) * denoised)
        if g2 == 0.0:
            return mean, None
        return sample_kernel(noise_fn, self, mean, math.sqrt(g2 * h), grid, i), None
