"""Exact Gaussian-mixture testbed: closed-form denoiser, score, log-density, exact samples, a
diffusers-style eps-model, and a reference probability-flow ODE solution.

Data ``p0 = sum_j pi_j N(mu_j, s_j^2 I)`` in ``D`` dimensions. Under ``x = alpha x0 + sigma eps``
(docs/methods/gaussian_mixture.md):

* ``v_j = alpha^2 s_j^2 + sigma^2``, ``w_j(x) ∝ pi_j N(x; alpha mu_j, v_j I)``,
* ``D(x) = sum_j w_j (mu_j + alpha s_j^2 / v_j (x - alpha mu_j))``,
* ``score(x) = (alpha D(x) - x) / sigma^2``.

Samples may have any shape ``(B, *dims)`` with ``prod(dims) = D`` (images, videos); all
arithmetic is done on the flattened ``(B, D)`` view in float64 unless the input is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffsample.solvers.solver import NoiseSchedule
from diffsample.core.accounting import add_model_evals
from diffsample.solvers.noise_schedules import DiscreteVP


def _as_batch(v: Tensor | float, b: int, like: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.expand(b) if v.ndim == 0 else v.reshape(b)


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Isotropic Gaussian mixture with closed-form denoiser under any noise level.

    Args:
        means: ``(K, D)`` component means.
        stds: ``(K,)`` component standard deviations ``s_j > 0``.
        weights: ``(K,)`` mixture weights, positive, normalised on construction.

    Raises:
        ValueError: mismatched shapes, non-positive stds or weights.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=torch.float64)
        stds = torch.as_tensor(self.stds, dtype=torch.float64).flatten()
        weights = torch.as_tensor(self.weights, dtype=torch.float64).flatten()
        if means.ndim != 2 or stds.numel() != means.shape[0] or weights.numel() != means.shape[0]:
            raise ValueError("means must be (K, D) and stds, weights (K,)")
        if not (stds > 0).all() or not (weights > 0).all():
            raise ValueError("stds and weights must be positive")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())

    @classmethod
    def random(cls, dim: int, components: int, seed: int = 0, spread: float = 1.0,
               std_range: tuple[float, float] = (0.05, 0.3)) -> "GaussianMixture":
        """A seeded random mixture: means ~ U[-spread, spread]^D, stds ~ U(std_range), Dirichlet(2) weights."""
        g = np.random.default_rng(seed)
        means = g.uniform(-spread, spread, size=(components, dim))
        stds = g.uniform(*std_range, size=components)
        weights = g.dirichlet(np.full(components, 2.0))
        return cls(torch.tensor(means), torch.tensor(stds), torch.tensor(weights))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ---- closed forms --------------------------------------------------------------------------
    def _parts(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float):
        b = x.shape[0]
        xf = x.reshape(b, -1)
        if xf.shape[1] != self.dim:
            raise ValueError(f"sample has {xf.shape[1]} values per item, the mixture has dim {self.dim}")
        mu, s2, logpi = (self.means.to(xf), (self.stds**2).to(xf), torch.log(self.weights).to(xf))
        a = _as_batch(alpha, b, xf)[:, None]
        sg = _as_batch(sigma, b, xf)[:, None]
        v = a**2 * s2[None] + sg**2  # (B, K)
        diff = xf[:, None, :] - a[:, :, None] * mu[None]  # (B, K, D)
        sq = (diff**2).sum(-1)
        log_comp = logpi[None] - 0.5 * self.dim * torch.log(2 * math.pi * v) - 0.5 * sq / v
        return xf, a, v, diff, log_comp, mu, s2

    def denoised(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Exact ``E[x0 | x_t = x]``; ``x`` of shape ``(B, *dims)``, alpha/sigma scalars or ``(B,)``."""
        xf, a, v, diff, log_comp, mu, s2 = self._parts(x, alpha, sigma)
        w = torch.softmax(log_comp, dim=1)
        c = a * s2[None] / v  # (B, K)
        m = mu[None] + c[:, :, None] * diff
        return (w[:, :, None] * m).sum(1).reshape(x.shape)

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """Exact ``log p_t(x)`` of the noisy marginal, shape ``(B,)`` (``sigma = 0``: the data density)."""
        return torch.logsumexp(self._parts(x, alpha, sigma)[4], dim=1)

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Exact ``grad_x log p_t(x) = (alpha D - x) / sigma^2``, shape of ``x``."""
        b = x.shape[0]
        a = _as_batch(alpha, b, x).reshape((b,) + (1,) * (x.ndim - 1))
        sg = _as_batch(sigma, b, x).reshape((b,) + (1,) * (x.ndim - 1))
        return (a * self.denoised(x, alpha, sigma) - x) / sg**2

    def component_posterior(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """``p(component j | x_t = x)``, shape ``(B, K)``."""
        return torch.softmax(self._parts(x, alpha, sigma)[4], dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of ``p0``, shape ``(n, D)``, float64."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[idx] + self.stds[idx, None] * z

    # ---- models ----------------------------------------------------------------------------------
    def denoiser(self, noise_schedule: NoiseSchedule) -> "GMMDenoiser":
        """The exact denoiser under ``noise_schedule`` as a diffsample ``Denoiser``."""
        return GMMDenoiser(self, noise_schedule)

    def eps_model(self, alphas_cumprod: Tensor, sample_shape: tuple[int, ...] | None = None) -> "GMMEpsModel":
        """A diffusers-style eps-prediction ``nn.Module`` for a discrete-VP process."""
        return GMMEpsModel(self, alphas_cumprod, sample_shape)

    # ---- reference ODE ---------------------------------------------------------------------------
    def reference_ode(self, x: Tensor, noise_schedule: NoiseSchedule, t_start: float, t_end: float | None,
                      rtol: float = 1e-10, atol: float = 1e-10, sigma_ve_floor: float = 1e-7) -> Tensor:
        """Accurate probability-flow ODE solution from ``x`` at ``t_start`` to ``t_end``.

        Integrated with scipy ``solve_ivp`` (DOP853) in VE coordinates ``y = x / alpha`` against
        ``u = log(sigma / alpha)``: ``dy/du = y - D(y; sigma_ve = e^u)``. ``t_end=None`` means the
        clean end (``sigma = 0``): the ODE is integrated down to ``sigma_ve_floor`` and the exact
        denoiser is applied there. Returns native-space samples with the shape of ``x`` (float64).
        """
        from scipy.integrate import solve_ivp

        ts = torch.tensor([t_start], dtype=torch.float64)
        s0, a0 = float(noise_schedule.sigma_ve(ts)), float(noise_schedule.alpha(ts))
        if t_end is None:
            s1, a1 = sigma_ve_floor, 1.0
        else:
            te = torch.tensor([t_end], dtype=torch.float64)
            s1, a1 = float(noise_schedule.sigma_ve(te)), float(noise_schedule.alpha(te))
        shape = x.shape
        y0 = (x.detach().to(torch.float64).reshape(shape[0], -1) / a0).numpy().ravel()

        def rhs(u: float, y: np.ndarray) -> np.ndarray:
            yt = torch.from_numpy(y).reshape(shape[0], -1)
            return (yt - self.denoised(yt, 1.0, math.exp(u))).numpy().ravel()

        sol = solve_ivp(rhs, (math.log(s0), math.log(s1)), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE failed: {sol.message}")
        y1 = torch.from_numpy(sol.y[:, -1]).reshape(shape[0], -1)
        if t_end is None:
            return self.denoised(y1, 1.0, s1).reshape(shape)
        return (a1 * y1).reshape(shape)


class GMMDenoiser:
    """The exact mixture denoiser as a diffsample ``Denoiser``: ``(x, t, cond=None) -> denoised``.

    ``t`` has shape ``(B,)`` in ``noise_schedule`` time. Each call records one model evaluation per
    sample (``diffsample.core.accounting``). ``cond`` is ignored (unconditional).
    """

    def __init__(self, gmm: GaussianMixture, noise_schedule: NoiseSchedule) -> None:
        self.gmm = gmm
        self.noise_schedule = noise_schedule

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        add_model_evals(x.shape[0])
        t64 = t.to(torch.float64)
        alpha = self.noise_schedule.alpha(t64).to(x.dtype)
        sigma = self.noise_schedule.sigma(t64).to(x.dtype)
        return self.gmm.denoised(x, alpha, sigma)


@dataclass
class EpsOutput:
    """diffusers-style model output: ``.sample`` holds the prediction."""

    sample: Tensor


class GMMEpsModel(nn.Module):
    """The exact mixture as a diffusers-style eps-prediction network for a discrete VP process.

    ``forward(sample, timestep, return_dict=True)`` with integer or fractional diffusers timesteps
    (scalar or ``(B,)``) returns ``EpsOutput(sample=eps)`` (or ``(eps,)``), where
    ``eps = (x - alpha D(x)) / sigma`` is exact for ``alpha_t = sqrt(alphas_cumprod[t])``
    (fractional ``t``: log-sigma interpolation, as :class:`DiscreteVP`). So diffusers schedulers
    and pipelines run it unchanged. ``config`` carries ``sample_size`` / ``in_channels`` for
    image-shaped samples ``(C, H, W)``.
    """

    def __init__(self, gmm: GaussianMixture, alphas_cumprod: Tensor, sample_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.gmm = gmm
        self.noise_schedule = DiscreteVP(alphas_cumprod)
        self.register_buffer("_dtype_probe", torch.zeros((), dtype=torch.float32), persistent=False)
        shape = tuple(sample_shape) if sample_shape is not None else (gmm.dim,)
        if math.prod(shape) != gmm.dim:
            raise ValueError(f"sample_shape {shape} does not hold {gmm.dim} values")
        self.config = SimpleNamespace(
            sample_size=shape[-1] if len(shape) == 3 else None,
            in_channels=shape[0] if len(shape) == 3 else None,
            out_channels=shape[0] if len(shape) == 3 else None,
            sample_shape=shape,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    @property
    def device(self) -> torch.device:
        return self._dtype_probe.device

    def forward(self, sample: Tensor, timestep: Tensor | float | int, return_dict: bool = True, **unused: Any):
        add_model_evals(sample.shape[0])
        b = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float64).flatten()
        t = t.expand(b) if t.numel() == 1 else t
        x = sample.to(torch.float64)
        alpha = self.noise_schedule.alpha(t)
        sigma = self.noise_schedule.sigma(t)
        d = self.gmm.denoised(x, alpha, sigma)
        shape = (b,) + (1,) * (x.ndim - 1)
        eps = ((x - alpha.reshape(shape) * d) / sigma.reshape(shape)).to(sample.dtype)
        return EpsOutput(eps) if return_dict else (eps,)
