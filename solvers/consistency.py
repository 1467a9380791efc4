"""Consistency-style multistep sampling for few-step students: predict x0, then re-noise with a fresh draw.

Two update rules, one idea (every step "denoise, then forward-noise to the next grid point"):

* :class:`LCM` -- multistep consistency sampling (Song et al. 2023, arXiv 2303.01469 Algorithm 1;
  latent consistency models, Luo et al. 2023, arXiv 2310.04378), as diffusers'
  ``LCMScheduler.step``.
* :class:`TCD` -- strategic stochastic sampling of trajectory consistency distillation (Zheng et al.
  2024, arXiv 2402.19159), as diffusers' ``TCDScheduler.step`` with
  ``eta = gamma``.

Both draw their fresh noise through :func:`~diffsample.solvers.transition.sample_kernel`, so the
guidance terms that act on the draw (NoiseTilt, SVDD) and best-of-N compose with them as with
ancestral Euler and the SDE solvers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, NoiseSchedule, call_denoise
from diffsample.solvers.transition import sample_kernel


def _at(ns: NoiseSchedule, t: float) -> tuple[float, float]:
    """``(alpha(t), sigma(t))`` as Python floats."""
    tt = torch.tensor([t], dtype=torch.float64)
    return float(ns.alpha(tt)[0]), float(ns.sigma(tt)[0])


def _renoise(x_s: Tensor, alpha_s: float, sigma_s: float, solver: object, grid: Grid, i: int,
             noise_fn: NoiseFn | None, exact: bool) -> Tensor:
    """Forward-noise ``x_s`` (at ``(alpha_s, sigma_s)``) to grid point ``i + 1``: the marginal-preserving
    kernel ``N((alpha_next / alpha_s) x_s, (sigma_next^2 - (alpha_next / alpha_s)^2 sigma_s^2) I)``.
    ``exact``: ``x_s`` already is at point ``i + 1`` (no draw)."""
    ratio = grid.alpha_list[i + 1] / alpha_s
    var = grid.sigma_list[i + 1] ** 2 - (ratio * sigma_s) ** 2
    if exact or var <= 0.0:
        return ratio * x_s
    return sample_kernel(noise_fn, solver, ratio * x_s, math.sqrt(var), grid, i)


@dataclass(frozen=True)
class LCM:
    r"""Multistep latent-consistency sampling (arXiv 2310.04378; diffusers ``LCMScheduler``).

    At grid point ``i`` with ``D`` the denoiser output at ``x_i`` (shapes ``(B, *dims)``):

    ``x0_hat = c_skip(t_i) x_i + c_out(t_i) D``  (with the boundary condition; else ``x0_hat = D``)

    ``x_{i+1} = alpha_{i+1} x0_hat + sigma_{i+1} z``,  ``z ~ N(0, I)`` fresh at every step,

    and the step to ``sigma = 0`` returns ``x0_hat`` (diffusers returns ``denoised`` on its last step).
    The consistency boundary condition (arXiv 2310.04378, with diffusers' constants) is
    ``c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)``, ``c_out = s t / sqrt((s t)^2 + sigma_data^2)``
    with ``s = timestep_scaling`` and ``t`` the diffusers timestep of the grid point, so it is defined
    on a :class:`~diffsample.solvers.noise_schedules.DiscreteVP` schedule only. ``boundary=None``
    (default) applies it there and not on other schedules; ``True`` demands it. At diffusers' constants
    ``c_skip`` is 7e-6 at the smallest timestep LCM uses (19) and 4e-8 at 259, so it matters only
    for a model trained with it at small timesteps or a smaller ``timestep_scaling``.

    Stages: 1 denoiser call per step; ``nfe = steps``. Stochastic: one draw per step except the
    last (kernel std ``sigma_{i+1}``). ``order`` is nominal (1): with the posterior-mean denoiser
    of a diffusion model this is not a discretisation of the probability-flow ODE; it is exact only
    for a model of the ODE's end point (a consistency model, arXiv 2303.01469).

    Raises:
        ValueError: ``boundary`` not true / false / None, ``timestep_scaling`` or ``sigma_data`` not > 0;
            at :meth:`init`, ``boundary=True`` on a schedule other than discrete VP.
    """

    boundary: bool | None = None
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if self.boundary is not None and not isinstance(self.boundary, bool):
            raise ValueError(f"boundary must be true, false or None (auto), got {self.boundary!r}")
        if not self.timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {self.timestep_scaling}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return True

    def init(self, x: Tensor, grid: Grid) -> None:
        self.applies_boundary(grid.noise_schedule)
        return None

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def applies_boundary(self, ns: NoiseSchedule) -> bool:
        """Whether the boundary condition is applied on ``ns``.

        Raises:
            ValueError: ``boundary=True`` and ``ns`` is not discrete VP (no diffusers timestep).
        """
        discrete = isinstance(ns, DiscreteVP)
        if self.boundary and not discrete:
            raise ValueError(f"lcm:boundary=true needs a discrete-VP schedule (diffusers timesteps), got {ns!r}; "
                             "valid: boundary=None (auto) or false")
        return discrete if self.boundary is None else self.boundary

    def boundary_scalings(self, t: float) -> tuple[float, float]:
        """``(c_skip, c_out)`` at diffusers timestep ``t`` (``get_scalings_for_boundary_condition_discrete``)."""
        scaled = t * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        x0_hat = call_denoise(denoise, x, grid.t_list[i])
        if self.applies_boundary(grid.noise_schedule):
            c_skip, c_out = self.boundary_scalings(grid.t_list[i])
            x0_hat = c_skip * x + c_out * x0_hat
        if grid.sigma_list[i + 1] == 0.0:
            return x0_hat, None
        return _renoise(x0_hat, 1.0, 0.0, self, grid, i, noise_fn, exact=False), None


@dataclass(frozen=True)
class TCD:
    r"""Strategic stochastic sampling (SSS) of TCD (arXiv 2402.19159; diffusers ``TCDScheduler``).

    From grid point ``i`` to ``i + 1``, with ``D`` the denoiser output at ``x_i`` and
    ``eps = (x_i - alpha_i D) / sigma_i``:

    1. jump along the trajectory to ``s = (1 - gamma) t_{i+1}`` (floored to an integer timestep on a
       :class:`~diffsample.solvers.noise_schedules.DiscreteVP` schedule, in float32 as diffusers
       computes it; measured from ``t_zero`` on others): ``x_s = alpha_s D + sigma_s eps`` (a DDIM step);
    2. forward-noise back to ``t_{i+1}`` with a fresh draw:
       ``x_{i+1} = (alpha_{i+1} / alpha_s) x_s + sqrt(sigma_{i+1}^2 - (alpha_{i+1} / alpha_s)^2 sigma_s^2) z``.

    The step to ``sigma = 0`` returns ``D``. ``gamma = 0`` is deterministic and equals DDIM
    (:class:`~diffsample.solvers.euler.Euler` with ``eta = 0``); ``gamma = 1`` jumps to the clean end and
    re-noises, i.e. :class:`LCM` without the boundary condition (exactly so on continuous schedules;
    on a discrete-VP schedule ``s = 0`` is diffusers' timestep 0, ``alpha_0^2 = 1 - beta_0``).
    diffusers' pipeline ends at timestep 0 rather than ``sigma = 0``; a grid ending at ``t = 0`` with
    ``final="last"`` reproduces that last step.

    Stages: 1 denoiser call per step; ``nfe = steps``. Stochastic when ``gamma > 0`` (one draw per
    step whose ``s < t_{i+1}``). Order 1 (the deterministic update, ``gamma = 0``, is DDIM).

    Raises:
        ValueError: ``gamma`` outside ``[0, 1]``.
    """

    gamma: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"tcd gamma must be in [0, 1] (0: deterministic DDIM, 1: LCM-like), got {self.gamma!r}")

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return self.gamma > 0

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def jump_time(self, ns: NoiseSchedule, t_next: float) -> float:
        """The intermediate time ``s`` of step 1 for the target time ``t_next`` (``s <= t_next``)."""
        if self.gamma == 0:
            return t_next
        if isinstance(ns, DiscreteVP):
            return float(torch.floor(torch.tensor(t_next, dtype=torch.float32) * (1.0 - self.gamma)))
        return ns.t_zero + (1.0 - self.gamma) * (t_next - ns.t_zero)

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        alpha, sigma = grid.alpha_list[i], grid.sigma_list[i]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        if grid.sigma_list[i + 1] == 0.0:
            return denoised, None
        ns, t_next = grid.noise_schedule, grid.t_list[i + 1]
        t_s = self.jump_time(ns, t_next)
        if t_s >= t_next:
            alpha_s, sigma_s = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        else:
            alpha_s, sigma_s = _at(ns, t_s)
        eps = (x - alpha * denoised) / sigma
        x_s = alpha_s * denoised + sigma_s * eps
        return _renoise(x_s, alpha_s, sigma_s, self, grid, i, noise_fn, exact=t_s >= t_next), None
