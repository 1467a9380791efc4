"""Restart sampling: Heun ODE steps with forward-noise jumps back up a noise interval (arXiv 2306.14878)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffsample.solvers.heun import Heun
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.substep import from_pure_noise, sample_substep

_HEUN = Heun()


@dataclass(frozen=True)
class Restart:
    r"""Restart sampling (Xu et al. 2023, arXiv 2306.14878, Algorithm 1): the probability-flow ODE
    solved with Heun's method (EDM Algorithm 1) on the run's grid, and ``restarts`` times, on
    reaching the restart point ``s_min``, a forward jump back up to ``s_max`` followed by Heun over
    ``restart_steps`` Karras (rho = 7) steps from ``s_max`` back down to ``s_min``.

    In VE coordinates (``x~ = x / alpha``, ``s = sigma / alpha``) a jump is the forward process

    ``x~(s_max) = x~(s_min) + s_noise sqrt(s_max^2 - s_min^2) z``,

    i.e. ``x(t_max) = (alpha_max / alpha_min) x(t_min) + alpha_max s_noise sqrt(s_max^2 - s_min^2) z``,
    drawn through the transition hook with the jump's own times (from ``t_min`` up to ``t_max``,
    :func:`~diffsample.solvers.substep.sample_substep`), so NoiseTilt / SVDD act on the jumps.

    ``s_min`` is the grid point whose VE sigma is nearest ``restart_sigma_min`` in log (not the
    first point, not ``sigma = 0``); the restarts run inside the step that ends there. ``s_max`` is
    ``restart_sigma_max``, capped at the process's largest sigma; no restart when ``s_max <= s_min``.
    The defaults (``[0.1, 2]``, 2 restarts of 4 steps) are diffsample's choice in the range the paper
    uses for Stable Diffusion; the official code and ComfyUI's ``restart`` sampler take a list of
    intervals (one interval here).

    * ``restarts = 0`` (or ``s_noise = 0``): plain Heun, order 2 (deterministic).
    * Cost: Heun's ``nfe`` plus ``2 restarts restart_steps`` calls.

    A step from ``alpha = 0`` (rectified flow at ``t = 1``) is the Euler (DDIM) step.

    Raises:
        ValueError: ``restarts < 0``, ``restart_steps < 1``, non-positive or inverted sigmas,
            ``s_noise < 0``.
    """

    restart_sigma_min: float = 0.1
    restart_sigma_max: float = 2.0
    restarts: int = 2
    restart_steps: int = 4
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 0:
            raise ValueError(f"restarts must be an integer >= 0, got {self.restarts!r}")
        if isinstance(self.restart_steps, bool) or not isinstance(self.restart_steps, int) or self.restart_steps < 1:
            raise ValueError(f"restart_steps must be an integer >= 1, got {self.restart_steps!r}")
        if not 0 < self.restart_sigma_min < self.restart_sigma_max:
            raise ValueError(f"need 0 < restart_sigma_min < restart_sigma_max, got {self.restart_sigma_min}, "
                             f"{self.restart_sigma_max}")
        if not self.s_noise >= 0:
            raise ValueError(f"s_noise must be >= 0, got {self.s_noise}")

    @property
    def order(self) -> int:
        return 2

    @property
    def stochastic(self) -> bool:
        return self.restarts > 0 and self.s_noise > 0

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def restart_point(self, grid: Grid) -> int | None:
        """Index of the grid point the restarts return to, or ``None`` (no restart on this grid)."""
        best, best_d = None, math.inf
        for k in range(1, grid.steps + 1):
            if grid.sigma_list[k] == 0.0:
                continue
            d = abs(math.log(grid.sigma_list[k] / grid.alpha_list[k]) - math.log(self.restart_sigma_min))
            if d < best_d:
                best, best_d = k, d
        if best is None or self.restarts == 0 or self.restart_sub_grid(grid, best) is None:
            return None
        return best

    def restart_sub_grid(self, grid: Grid, k: int) -> Grid | None:
        """The Heun grid of one restart segment, from ``s_max`` down to grid point ``k``."""
        ns = grid.noise_schedule
        s_min = grid.sigma_list[k] / grid.alpha_list[k]
        s_max = min(self.restart_sigma_max, ns.sigma_ve_range()[1])
        if not s_max > s_min:
            return None
        ramp = torch.linspace(0, 1, self.restart_steps + 1, dtype=torch.float64)
        rho = 7.0
        s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        t = ns.t_from_sigma_ve(s)
        t[-1] = grid.t_list[k]
        return Grid.from_t(ns, t)

    def nfe(self, grid: Grid) -> int:
        base = sum(1 if (grid.alpha_list[i] == 0.0 or grid.sigma_list[i + 1] == 0.0) else 2 for i in range(grid.steps))
        k = self.restart_point(grid) if self.stochastic else None
        return base + (0 if k is None else 2 * self.restarts * self.restart_steps)

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        if grid.alpha_list[i] == 0.0:
            denoised = call_denoise(denoise, x, grid.t_list[i])
            x_next = from_pure_noise(self, x, denoised, grid, i, 0.0, None)
        else:
            x_next, _ = _HEUN.step(denoise, x, grid, i, None)
        if not self.stochastic or self.restart_point(grid) != i + 1:
            return x_next, None
        sub = self.restart_sub_grid(grid, i + 1)
        t_min, t_max = grid.t_list[i + 1], sub.t_list[0]
        s_min = grid.sigma_list[i + 1] / grid.alpha_list[i + 1]
        s_max = sub.sigma_list[0] / sub.alpha_list[0]
        lift = sub.alpha_list[0] / grid.alpha_list[i + 1]
        std = sub.alpha_list[0] * self.s_noise * math.sqrt(s_max**2 - s_min**2)
        for _ in range(self.restarts):
            x_next = sample_substep(noise_fn, self, lift * x_next, std, grid, i, t_min, t_max)
            for j in range(sub.steps):
                x_next, _ = _HEUN.step(denoise, x_next, sub, j, None)
        return x_next, None
