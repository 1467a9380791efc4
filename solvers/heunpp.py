"""Heun++ (heunpp2): a three-stage Euler-Heun blend with sigma-dependent weights."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from diffsample.solvers._ve_multistep import eps_of
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise


@dataclass(frozen=True)
class HeunPP2:
    r"""Heun++ as ComfyUI's ``sample_heunpp2`` (from Carzit's sd-webui-samplers-scheduler) defines it.

    In VE coordinates ``y = x / alpha``, ``s = sigma / alpha``, slope ``d = (y - D) / s``, with
    ``dt = s_{i+1} - s_i`` and ``s_0`` the first VE sigma of the run:

    * last step: Euler, ``y_{i+1} = y_i + dt d_i`` (``x = D`` when it ends at ``sigma = 0``);
    * second-to-last step: ``y' = y_i + dt d_i``, ``d_2 = d(y', s_{i+1})``, ``w_2 = s_{i+1} / (2 s_0)``,
      ``y_{i+1} = y_i + dt ((1 - w_2) d_i + w_2 d_2)``;
    * other steps: also ``y'' = y' + (s_{i+2} - s_{i+1}) d_2``, ``d_3 = d(y'', s_{i+2})``,
      ``w_2 = s_{i+1} / (3 s_0)``, ``w_3 = s_{i+2} / (3 s_0)``,
      ``y_{i+1} = y_i + dt ((1 - w_2 - w_3) d_i + w_2 d_2 + w_3 d_3)``.

    The weights of the extra slopes shrink with sigma, so the method is Euler-like at low noise:
    its convergence order is 1 (measured, tests/solvers/test_order.py), at 3 denoiser calls per
    step. There is no paper; ComfyUI's code is GPL-3 and not used: the test checks this update
    against the rules above written out independently. A step from ``alpha = 0`` (flow grid at
    ``t = 1``) is a plain Euler step. Deterministic (no churn).
    """

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    @staticmethod
    def stages(grid: Grid, i: int) -> int:
        """Denoiser calls of step ``i``: 1 on the last step (and from ``alpha = 0``), 2 on the
        second-to-last, 3 otherwise."""
        if grid.alpha_list[i] == 0.0:
            return 1
        return min(3, grid.steps - i)

    def nfe(self, grid: Grid) -> int:
        return sum(self.stages(grid, i) for i in range(grid.steps))

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        alpha, sigma = grid.alpha_list[i], grid.sigma_list[i]
        alpha_next, sigma_next = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        d = eps_of(x, denoised, alpha, sigma)
        s_next = sigma_next / alpha_next
        y_euler = denoised + s_next * d  # y_i + dt d_i
        stages = self.stages(grid, i)
        if stages == 1:
            return alpha_next * y_euler, None
        s, s0 = sigma / alpha, grid.sigma_list[0] / grid.alpha_list[0] if grid.alpha_list[0] > 0 else float("inf")
        dt = s_next - s
        d2 = (y_euler - call_denoise(denoise, alpha_next * y_euler, grid.t_list[i + 1])) / s_next
        if stages == 2:
            w2 = s_next / (2 * s0)
            return alpha_next * (y_euler + (dt * w2) * (d2 - d)), None
        alpha_2, s_2 = grid.alpha_list[i + 2], grid.sigma_list[i + 2] / grid.alpha_list[i + 2]
        y3 = y_euler + (s_2 - s_next) * d2
        d3 = (y3 - call_denoise(denoise, alpha_2 * y3, grid.t_list[i + 2])) / s_2
        w2, w3 = s_next / (3 * s0), s_2 / (3 * s0)
        return alpha_next * (y_euler + (dt * w2) * (d2 - d) + (dt * w3) * (d3 - d)), None
