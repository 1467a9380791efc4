"""Noise schedules: the forward process ``x_t = alpha(t) * x0 + sigma(t) * eps``.

* :class:`DiscreteVP` -- DDPM/LDM models (SD 1.x/2.x, DDPMPipeline): alphas_cumprod from a
  diffusers scheduler config; ``t`` is the diffusers timestep (float; fractional timesteps are
  interpolated linearly in log VE-sigma, as diffusers' ``_sigma_to_t`` and k-diffusion's
  ``DiscreteSchedule`` do).
* :class:`LinearVP` -- continuous VP with linear beta (Song et al. 2021, arXiv 2011.13456;
  DPM-Solver's ``NoiseScheduleVP('linear')``), t in [t_min, 1].
* :class:`VE` -- VE / EDM (Karras et al. 2022, arXiv 2206.00364): alpha = 1, sigma = t.
* :class:`RectifiedFlow` -- x_t = (1 - t) x0 + t eps (SD3 / FLUX, arXiv 2403.03206), t in [t_min, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffsample.solvers.numerics import interp
from diffsample.solvers.solver import NoiseSchedule

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule betas (Nichol & Dhariwal 2021, arXiv 2102.09672 eq. 17), as diffusers builds them."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


class DiscreteVP(NoiseSchedule):
    """Discrete-time VP process of a DDPM-trained model: ``alpha_t = sqrt(alphas_cumprod[t])``.

    ``t`` is the diffusers timestep in ``[0, N - 1]``. Between integer timesteps, the VE sigma
    ``sqrt((1 - abar) / abar)`` is interpolated linearly in log space (diffusers ``_sigma_to_t``,
    k-diffusion ``DiscreteSchedule.t_to_sigma``), so the schedule is continuous and invertible.

    Args:
        alphas_cumprod: shape ``(N,)``, decreasing, in (0, 1).

    Raises:
        ValueError: if ``alphas_cumprod`` is not 1-D, not strictly decreasing or leaves (0, 1).
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not ((ac > 0) & (ac < 1)).all() or not (ac[1:] < ac[:-1]).all():
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-D sequence in (0, 1)")
        self.alphas_cumprod = ac
        self.num_train_timesteps = ac.numel()
        self._timesteps = torch.arange(ac.numel(), dtype=torch.float64)
        self._log_sigma_ve = 0.5 * (torch.log1p(-ac) - torch.log(ac))
        self.t_min = 0.0
        self.t_max = float(ac.numel() - 1)
        self.t_zero = 0.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiscreteVP":
        """Build from a diffusers scheduler config (``pipe.scheduler.config`` or a JSON dict).

        Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``
        (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``) or ``trained_betas``; betas are
        built in float32 exactly as diffusers does, so alphas match its schedulers bit for bit.

        Raises:
            ValueError: unknown ``beta_schedule``, or ``rescale_betas_zero_snr`` (sigma = inf at
                the last timestep; not supported).
        """
        n = int(config.get("num_train_timesteps", 1000))
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("rescale_betas_zero_snr=True is not supported (infinite VE sigma at t = N - 1)")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        else:
            kind = config.get("beta_schedule", "linear")
            b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
            if kind == "linear":
                betas = torch.linspace(b0, b1, n, dtype=torch.float32)
            elif kind == "scaled_linear":
                betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
            elif kind == "squaredcos_cap_v2":
                betas = _betas_for_alpha_bar(n)
            else:
                raise ValueError(f"unknown beta_schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    def sigma_ve(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.exp(interp(t, self._timesteps, self._log_sigma_ve))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.rsqrt(1.0 + self.sigma_ve(t) ** 2)

    def sigma(self, t: Tensor) -> Tensor:
        s = self.sigma_ve(t)
        return s * torch.rsqrt(1.0 + s**2)

    def lambda_(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return -interp(t, self._timesteps, self._log_sigma_ve)

    def t_from_lambda(self, lambda_: Tensor) -> Tensor:
        return interp(-torch.as_tensor(lambda_, dtype=torch.float64), self._log_sigma_ve, self._timesteps)

    def __repr__(self) -> str:
        return f"DiscreteVP(num_train_timesteps={self.num_train_timesteps})"


class LinearVP(NoiseSchedule):
    """Continuous VP with linear beta: ``log alpha(t) = -(beta_1 - beta_0) t**2 / 4 - beta_0 t / 2``.

    Song et al. 2021 (arXiv 2011.13456) VP-SDE; inverse of ``lambda_`` from DPM-Solver
    (arXiv 2206.00927, appendix; ``NoiseScheduleVP.inverse_lambda``).
    """

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0) -> None:
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.beta_0, self.beta_1 = float(beta_0), float(beta_1)
        self.t_min, self.t_max, self.t_zero = float(t_min), float(t_max), 0.0

    def _log_alpha(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def lambda_(self, t: Tensor) -> Tensor:
        log_alpha = self._log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def t_from_lambda(self, lambda_: Tensor) -> Tensor:
        lambda_ = torch.as_tensor(lambda_, dtype=torch.float64)
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lambda_, torch.zeros_like(lambda_))
        delta = self.beta_0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def __repr__(self) -> str:
        return f"LinearVP(beta_0={self.beta_0}, beta_1={self.beta_1})"


class VE(NoiseSchedule):
    """Variance-exploding / EDM process: ``alpha = 1``, ``sigma = t`` (Karras et al. 2022, arXiv 2206.00364)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max, self.t_zero = float(sigma_min), float(sigma_max), 0.0

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def lambda_(self, t: Tensor) -> Tensor:
        return -torch.log(torch.as_tensor(t, dtype=torch.float64))

    def t_from_lambda(self, lambda_: Tensor) -> Tensor:
        return torch.exp(-torch.as_tensor(lambda_, dtype=torch.float64))

    def __repr__(self) -> str:
        return f"VE(sigma_min={self.t_min}, sigma_max={self.t_max})"


class RectifiedFlow(NoiseSchedule):
    """Rectified flow ``x_t = (1 - t) x0 + t eps``, t = 0 clean, t = 1 pure noise (arXiv 2209.03003,
    SD3 arXiv 2403.03206). Timestep shifting (SD3 / FLUX) is a step schedule: see ``flow_shift``.

    ``lambda_ = log((1 - t) / t)``; ``t_from_lambda = sigmoid(-lambda_)``. The VE sigma is
    infinite at t = 1, so VE-sigma schedules (Karras, exponential, lambda-uniform) start at
    ``t_max_finite`` instead.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0, t_max_finite: float = 1.0 - 1e-3) -> None:
        if not 0 < t_min < t_max_finite <= t_max <= 1:
            raise ValueError(f"need 0 < t_min < t_max_finite <= t_max <= 1, got {t_min}, {t_max_finite}, {t_max}")
        self.t_min, self.t_max, self.t_zero = float(t_min), float(t_max), 0.0
        self._t_max_finite = min(float(t_max_finite), self.t_max)

    @property
    def t_max_finite(self) -> float:
        return self._t_max_finite if self.t_max >= 1.0 else self.t_max

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - torch.as_tensor(t, dtype=torch.float64)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def lambda_(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.log1p(-t) - torch.log(t)

    def t_from_lambda(self, lambda_: Tensor) -> Tensor:
        return torch.sigmoid(-torch.as_tensor(lambda_, dtype=torch.float64))

    def __repr__(self) -> str:
        return f"RectifiedFlow(t_min={self.t_min}, t_max={self.t_max})"
