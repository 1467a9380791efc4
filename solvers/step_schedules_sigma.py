"""Closed-form noise-level step schedules of k-diffusion and ComfyUI: KL-optimal, Laplace, VP and
Mochi's linear-quadratic, plus the conversions from a peer's "sigma" to a noise schedule's time.

Two noise levels appear in peer code, and the schedules here say which one they use:

* the **VE sigma** ``sigma / alpha = exp(-lambda_)`` (k-diffusion, EDM, ComfyUI on VP/VE models):
  :func:`t_from_ve_sigmas`;
* the **model sigma** as ComfyUI and diffusers hand it to the model: the VE sigma on VP/VE
  processes, the flow time ``t`` on rectified flow (ComfyUI's flow models, diffusers'
  ``FlowMatch*`` sigmas): :func:`t_from_model_sigmas`.

Every schedule returns ``n`` strictly decreasing times (noisiest first, float64, shape ``(n,)``):
the peer's list for ``n`` steps without its terminal ``0``, which the sampler appends
(``final="zero"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffsample.solvers.noise_schedules import RectifiedFlow
from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.step_schedules import check_steps

def ve_bounds(ns: NoiseSchedule, sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` in VE sigma: the given values, else the noise schedule's range.

    Raises:
        ValueError: unless ``0 < sigma_min < sigma_max``.
    """
    lo, hi = ns.sigma_ve_range()
    lo = lo if sigma_min is None else float(sigma_min)
    hi = hi if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _check_decreasing(t: Tensor, values: Tensor, what: str, lo: float, hi: float, unit: str) -> Tensor:
    if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"{what}: {unit} {[round(float(v), 6) for v in values]} leave the noise schedule's range "
                         f"[{lo:.6g}, {hi:.6g}] so that clipped points coincide; choose a table or options inside it")
    return t


def t_from_ve_sigmas(ns: NoiseSchedule, sigma_ve: Tensor, what: str = "schedule") -> Tensor:
    """Times of ``ns`` at the VE sigmas ``sigma_ve`` (shape ``(n,)``, decreasing, > 0).

    Values above the noise schedule's VE range are clipped to its noisiest point, as a model clips
    the noise level it is evaluated at; clipped values that then coincide are refused. Values below
    the range map to times below ``t_min`` (a stop's truncated grid rescales them; a plain run
    refuses them when it builds the grid).

    Raises:
        ValueError: a value <= 0 or not finite, or clipping makes two points coincide (the message
            names the values, the range and ``what``).
    """
    s = torch.as_tensor(sigma_ve, dtype=torch.float64).flatten()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"{what}: VE sigmas must be finite and > 0, got {s.tolist()}")
    lo, hi = ns.sigma_ve_range()
    t = ns.t_from_sigma_ve(s.clamp(max=hi)).clamp(max=ns.t_max_finite)
    return _check_decreasing(t, s, what, lo, hi, "VE sigmas")


def t_from_model_sigmas(ns: NoiseSchedule, sigma: Tensor, what: str = "schedule") -> Tensor:
    """Times of ``ns`` at ComfyUI's / diffusers' model sigmas: the flow time itself on
    :class:`RectifiedFlow` (clipped to ``t_max``), the VE sigma otherwise
    (:func:`t_from_ve_sigmas`).

    Raises:
        ValueError: as :func:`t_from_ve_sigmas`.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    if not isinstance(ns, RectifiedFlow):
        return t_from_ve_sigmas(ns, s, what)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"{what}: flow sigmas must be finite and > 0, got {s.tolist()}")
    t = s.clamp(max=ns.t_max)
    return _check_decreasing(t, s, what, ns.t_min, ns.t_max, "flow sigmas")


def model_sigma_max(ns: NoiseSchedule) -> float:
    """ComfyUI's ``model_sampling.sigma_max`` for ``ns``: ``t_max`` on rectified flow, else the
    largest VE sigma."""
    return float(ns.t_max) if isinstance(ns, RectifiedFlow) else ns.sigma_ve_range()[1]


@dataclass(frozen=True)
class KLOptimal:
    """KL-optimal schedule, the closed form of Align Your Steps (Sabour et al., arXiv 2404.14507,
    Theorem 3.1): ``sigma_i = tan((1 - i/(n-1)) atan(sigma_max) + i/(n-1) atan(sigma_min))`` on the
    VE sigma, ``i = 0..n-1`` (ComfyUI ``kl_optimal``, A1111 PR 15608). ``n = 1`` gives
    ``[sigma_max]``. ComfyUI applies the formula to the flow time on flow models; here it is the VE
    sigma on every process, as in the paper.
    """

    sigma_min: float | None = None
    sigma_max: float | None = None

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        lo, hi = ve_bounds(ns, self.sigma_min, self.sigma_max)
        u = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
        s = torch.tan(u * math.atan(lo) + (1 - u) * math.atan(hi))
        return t_from_ve_sigmas(ns, s, "kl_optimal")


@dataclass(frozen=True)
class Laplace:
    """Laplace schedule (Hang et al. 2024, arXiv 2407.03297; k-diffusion as ComfyUI ships it,
    ``get_sigmas_laplace``): ``log sigma_i = mu - beta sgn(1/2 - x_i) log(1 - 2 |1/2 - x_i| + 1e-5)``,
    ``x = linspace(0, 1, n)``, clipped to ``[sigma_min, sigma_max]`` (VE sigma). Steps concentrate
    around ``sigma = e^mu``.

    Raises:
        ValueError: ``beta <= 0``; options whose clipped points coincide.
    """

    mu: float = 0.0
    beta: float = 0.5
    sigma_min: float | None = None
    sigma_max: float | None = None

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        lo, hi = ve_bounds(ns, self.sigma_min, self.sigma_max)
        x = torch.linspace(0, 1, n, dtype=torch.float64)
        lmb = self.mu - self.beta * torch.sign(0.5 - x) * torch.log(1 - 2 * (0.5 - x).abs() + 1e-5)
        return t_from_ve_sigmas(ns, torch.exp(lmb).clamp(lo, hi), "laplace")


@dataclass(frozen=True)
class VPSigmas:
    """k-diffusion ``get_sigmas_vp``: uniform in the time ``s`` of the linear-beta VP SDE,
    ``s = linspace(1, eps_s, n)``, ``sigma = sqrt(exp(beta_d s^2 / 2 + beta_min s) - 1)`` (Song et
    al. 2021, arXiv 2011.13456). On a process whose VE range is narrower than ``sigma(eps_s) ..
    sigma(1)``, the same uniform-in-``s`` law is used between the values of ``s`` where the process's
    range ends (on ``LinearVP()`` the defaults are exactly k-diffusion's).

    Raises:
        ValueError: ``beta_d < 0``, ``beta_min < 0`` (or both 0), ``eps_s`` outside (0, 1).
    """

    beta_d: float = 19.9
    beta_min: float = 0.1
    eps_s: float = 1e-3

    def __post_init__(self) -> None:
        if self.beta_d < 0 or self.beta_min < 0 or not (self.beta_d + self.beta_min) > 0:
            raise ValueError(f"need beta_d >= 0, beta_min >= 0, not both 0; got beta_d={self.beta_d}, "
                             f"beta_min={self.beta_min}")
        if not 0 < self.eps_s < 1:
            raise ValueError(f"eps_s must be in (0, 1), got {self.eps_s}")

    def sigma(self, s: Tensor) -> Tensor:
        """VE sigma at VP-SDE time ``s``."""
        return torch.sqrt(torch.expm1(self.beta_d * s**2 / 2 + self.beta_min * s))

    def s_from_sigma(self, sigma: float) -> float:
        """Inverse of :meth:`sigma`."""
        level = math.log1p(sigma**2)
        if self.beta_d == 0:
            return level / self.beta_min
        return (-self.beta_min + math.sqrt(self.beta_min**2 + 2 * self.beta_d * level)) / self.beta_d

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        lo, hi = ns.sigma_ve_range()
        s_hi = min(1.0, self.s_from_sigma(hi))
        s_lo = max(self.eps_s, self.s_from_sigma(lo))
        if not s_lo < s_hi:
            raise ValueError(f"vp: the VP-SDE noise range sigma({self.eps_s:g}) .. sigma(1) does not overlap the noise "
                             f"schedule's VE range [{lo:.6g}, {hi:.6g}]")
        s = torch.linspace(s_hi, s_lo, n, dtype=torch.float64) if n > 1 else torch.tensor([s_hi], dtype=torch.float64)
        return t_from_ve_sigmas(ns, self.sigma(s), "vp")


@dataclass(frozen=True)
class LinearQuadratic:
    """Mochi's linear-quadratic schedule (Genmo ``mochi_preview``; ComfyUI ``linear_quadratic``):
    for ``n >= 2``, ``linear_steps = L`` points with ``u_i = 1 - i thr / L`` then a quadratic in
    ``i`` from ``1 - thr`` at ``i = L`` to 0 at ``i = n``; ``n = 1`` gives ``[1]``. The model sigma is
    ``u * sigma_max`` (:func:`t_from_model_sigmas`: the flow time on rectified flow, the VE sigma
    scaled by the largest VE sigma otherwise, as ComfyUI does).

    Raises:
        ValueError: ``threshold_noise`` outside (0, 0.5); ``linear_steps`` outside ``[1, n - 1]``.
    """

    threshold_noise: float = 0.025
    linear_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.threshold_noise < 0.5:
            raise ValueError(f"threshold_noise must be in (0, 0.5), got {self.threshold_noise}")

    def fractions(self, n: int) -> list[float]:
        """The ``n`` values ``u_i`` (1 = the largest model sigma), before the terminal 0."""
        n = check_steps(n)
        if n == 1:
            return [1.0]
        ls = n // 2 if self.linear_steps is None else int(self.linear_steps)
        if not 1 <= ls <= n - 1:
            raise ValueError(f"linear_steps must be in [1, {n - 1}] for {n} steps, got {self.linear_steps}")
        thr = self.threshold_noise
        rising = [i * thr / ls for i in range(ls)]
        diff = ls - thr * n
        qs = n - ls
        a = diff / (ls * qs**2)
        b = thr / ls - 2 * diff / qs**2
        c = a * ls**2
        rising += [a * i**2 + b * i + c for i in range(ls, n)]
        return [1.0 - x for x in rising]

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        u = torch.tensor(self.fractions(n), dtype=torch.float64)
        return t_from_model_sigmas(ns, u * model_sigma_max(ns), "linear_quadratic")


__all__ = ["KLOptimal", "Laplace", "LinearQuadratic", "VPSigmas", "model_sigma_max", "t_from_model_sigmas",
           "t_from_ve_sigmas", "ve_bounds"]
