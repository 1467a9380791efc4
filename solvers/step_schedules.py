"""Step schedules: where to evaluate the model.

A step schedule is a callable ``(noise_schedule, n) -> t`` returning ``n`` strictly decreasing
times (noisiest first, shape ``(n,)``, float64) in the noise schedule's own time unit. The sampler
asks for ``steps`` points and appends the clean end ``sigma = 0`` (``final="zero"``), or asks for
``steps + 1`` points and stops at the last one (``final="last"``), so ``steps`` is always the number
of intervals. VE-sigma schedules (Karras, exponential, polyexponential, lambda-uniform) work on
``sigma / alpha = exp(-lambda_)`` and map back through ``t_from_lambda``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.noise_schedules import DiscreteVP, RectifiedFlow


def check_steps(n: int) -> int:
    """``n`` as an ``int`` when it is an integer >= 1 (bools refused).

    Raises:
        ValueError: ``n`` is not an integer or is < 1 (the message names the value).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of points must be an integer >= 1, got {n!r}")
    return int(n)


def _ve_bounds(ns: NoiseSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    lo, hi = ns.sigma_ve_range()
    lo = lo if sigma_min is None else float(sigma_min)
    hi = hi if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _from_sigma_ve(ns: NoiseSchedule, sigma_ve: Tensor) -> Tensor:
    t = ns.t_from_sigma_ve(sigma_ve.to(torch.float64))
    return t.clamp(ns.t_min, ns.t_max)


@dataclass(frozen=True)
class TimeUniform:
    """Uniform in the schedule's time ``t``.

    On :class:`DiscreteVP` it follows diffusers' multistep schedulers
    (``DPMSolverMultistepScheduler.set_timesteps``, Lin et al. 2023, arXiv 2305.08891 table 2),
    integer timesteps:

    * ``"linspace"``: ``linspace(0, N - 1, n + 1).round()[::-1][:-1]`` (last call at t ~ (N-1)/n);
    * ``"leading"``: ``arange(n + 1) * (N // (n + 1))`` reversed, minus the last, plus ``steps_offset``;
    * ``"trailing"``: ``arange(N, 0, -N / n).round() - 1`` (starts at N - 1).

    On continuous schedules all three spacings give ``linspace(t_max, t_min, n)``, except
    ``"trailing"``, which omits ``t_min`` like diffusers' flow-matching schedulers:
    ``linspace(t_max, t_min, n + 1)[:-1]``.
    """

    spacing: Literal["linspace", "leading", "trailing"] = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        if self.spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"spacing must be 'linspace', 'leading' or 'trailing', got {self.spacing!r}")

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        if isinstance(ns, DiscreteVP):
            big_n = ns.num_train_timesteps
            if self.spacing == "linspace":
                t = np.linspace(0, big_n - 1, n + 1).round()[::-1][:-1]
            elif self.spacing == "leading":
                t = (np.arange(0, n + 1) * (big_n // (n + 1))).round()[::-1][:-1] + self.steps_offset
            else:
                t = np.arange(big_n, 0, -big_n / n).round() - 1
            return torch.tensor(t.copy(), dtype=torch.float64)
        if self.spacing == "trailing":
            return torch.linspace(ns.t_max, ns.t_min, n + 1, dtype=torch.float64)[:-1]
        return torch.linspace(ns.t_max, ns.t_min, n, dtype=torch.float64) if n > 1 else torch.tensor([ns.t_max], dtype=torch.float64)


@dataclass(frozen=True)
class LambdaUniform:
    """Uniform in ``lambda_`` (log-SNR spacing of DPM-Solver, arXiv 2206.00927 section 3.3), which is
    uniform in log VE-sigma, i.e. k-diffusion's ``get_sigmas_exponential``. Includes both ends."""

    sigma_min: float | None = None
    sigma_max: float | None = None

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        lo, hi = _ve_bounds(ns, self.sigma_min, self.sigma_max)
        log_s = torch.linspace(np.log(hi), np.log(lo), n, dtype=torch.float64) if n > 1 else torch.tensor([np.log(hi)], dtype=torch.float64)
        return _from_sigma_ve(ns, torch.exp(log_s))


@dataclass(frozen=True)
class _RhoSchedule:
    """Shared fields of the VE-sigma schedules shaped by an exponent ``rho`` (> 0) between
    ``sigma_min`` and ``sigma_max`` (``None``: the noise schedule's range)."""

    rho: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")


@dataclass(frozen=True)
class Karras(_RhoSchedule):
    """Karras et al. 2022 (arXiv 2206.00364 eq. 5): ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho)
    - smax^(1/rho)))^rho`` on the VE sigma (k-diffusion ``get_sigmas_karras``). Includes both ends."""

    rho: float = 7.0

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        lo, hi = _ve_bounds(ns, self.sigma_min, self.sigma_max)
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        s = (hi ** (1 / self.rho) + ramp * (lo ** (1 / self.rho) - hi ** (1 / self.rho))) ** self.rho
        return _from_sigma_ve(ns, s)


@dataclass(frozen=True)
class PolyExponential(_RhoSchedule):
    """k-diffusion ``get_sigmas_polyexponential``: ``log sigma`` follows ``ramp**rho`` from max to min
    (rho = 1 is the exponential / lambda-uniform schedule)."""

    rho: float = 1.0

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        lo, hi = _ve_bounds(ns, self.sigma_min, self.sigma_max)
        ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** self.rho
        return _from_sigma_ve(ns, torch.exp(ramp * (np.log(hi) - np.log(lo)) + np.log(lo)))


@dataclass(frozen=True)
class FlowShift:
    """SD3 / FLUX timestep shift (Esser et al. 2024, arXiv 2403.03206 eq. 23) for rectified flow:
    ``t' = shift t / (1 + (shift - 1) t)`` applied to ``TimeUniform(spacing)``. FLUX's resolution-
    dependent shift is ``shift = exp(mu)``.

    Raises:
        ValueError: ``shift <= 0``, or a noise schedule other than :class:`RectifiedFlow`.
    """

    shift: float = 3.0
    spacing: Literal["linspace", "trailing"] = "linspace"

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        if not isinstance(ns, RectifiedFlow):
            raise ValueError(f"flow_shift needs a RectifiedFlow noise schedule, got {ns!r}")
        t = TimeUniform(self.spacing)(ns, n)
        return (self.shift * t / (1 + (self.shift - 1) * t)).clamp(ns.t_min, ns.t_max)


@dataclass(frozen=True)
class Fixed:
    """Given times (distilled students, AYS-style tuned grids). ``n`` must equal ``len(t)``.

    Raises:
        ValueError: when asked for a different number of points than were given.
    """

    t: tuple[float, ...]

    def __init__(self, t: Sequence[float]) -> None:
        object.__setattr__(self, "t", tuple(float(v) for v in t))

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        if n != len(self.t):
            raise ValueError(f"fixed schedule has {len(self.t)} points, cannot produce {n}")
        return torch.tensor(self.t, dtype=torch.float64)


def fixed(t: Sequence[float]) -> Fixed:
    """A :class:`Fixed` step schedule at the given times (noisiest first)."""
    return Fixed(t)
