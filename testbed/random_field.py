"""Exact image-like testbed: mixtures of stationary Gaussian random fields on a torus.

Data ``p0 = sum_k pi_k N(m_k, C_k)`` on ``(C, H, W)`` images (periodic boundaries). Each ``C_k`` is
*stationary*: per channel, diagonal in the orthonormal 2-D DFT (``X = fft2(x, norm="ortho")``) with
a spectrum ``S_k(c, f) > 0`` that is symmetric (``S(f) = S(-f)``, so ``C_k`` is real), e.g. a power
law ``S(f) ∝ (f0^2 + |f|^2)^(-gamma / 2)`` (:func:`power_law_spectrum`); ``m_k`` are templates
(smooth images). Unlike the isotropic :mod:`.gmm`, these fields are spatially correlated, so a
reward gradient is a smooth image (the regime NoiseTilt's whitening operator ``W`` is built for).

Everything is closed form under ``x_t = alpha x0 + sigma eps`` (per frequency, ``v_k = alpha^2 S_k +
sigma^2``):

* ``log N(x_t; alpha m_k, alpha^2 C_k + sigma^2 I) = -1/2 sum_f |X_t - alpha M_k|^2 / v_k
  - 1/2 sum_f log(2 pi v_k)``; the component posterior ``w_k(x_t)`` is the softmax of
  ``log pi_k`` plus that (the mixture posterior weights in closed form);
* the denoiser (per-frequency Wiener filter): ``D(x_t) = sum_k w_k (m_k + F^-1[alpha S_k / v_k
  (X_t - alpha M_k)])``; ``score = (alpha D - x_t) / sigma^2``; ``log p_t`` exactly;
* exactly tilted targets ``p0(x) exp(r(x) / beta)`` stay in the family (:meth:`tilted_linear`,
  :meth:`tilted_quadratic`; the Gaussian-mixture formulas of docs/methods/gaussian_mixture.md
  with ``C_k`` applied by FFT);
* exact first and second moments of any linear feature map (:meth:`linear_moments`), for Frechet
  distances to the exact target (:func:`frechet_distance`).

All arithmetic is float64 (the outputs take the input's dtype); batches are processed in chunks of
``chunk`` rows to bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsample.core.accounting import add_model_evals
from diffsample.solvers.solver import NoiseSchedule


def _fft(x: Tensor) -> Tensor:
    return torch.fft.fft2(x, norm="ortho")


def _ifft(x: Tensor) -> Tensor:
    return torch.fft.ifft2(x, norm="ortho").real


def reflect(s: Tensor) -> Tensor:
    """``s(-f)`` of a spectrum ``(..., H, W)`` indexed like ``fft2`` output."""
    h, w = s.shape[-2:]
    return s[..., (-torch.arange(h)) % h, :][..., (-torch.arange(w)) % w]


def frequencies(h: int, w: int) -> Tensor:
    """``|f|^2`` in integer cycles per side, ``(H, W)`` float64, indexed like ``fft2`` output."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64) * h
    fx = torch.fft.fftfreq(w, dtype=torch.float64) * w
    return fy[:, None] ** 2 + fx[None, :] ** 2


def power_law_spectrum(shape: tuple[int, int, int], exponent: float = 3.0, cutoff: float = 1.0,
                       variance: float = 1.0) -> Tensor:
    """``S(f) ∝ (cutoff^2 + |f|^2)^(-exponent / 2)`` per channel, scaled so every pixel has variance
    ``variance`` (``Var x_p = mean_f S(f)`` under the orthonormal DFT). Shape ``(C, H, W)``, float64.

    Raises:
        ValueError: ``cutoff <= 0`` or ``variance <= 0`` or a shape that is not ``(C, H, W)``.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"power_law_spectrum: shape must be (C, H, W), got {shape}")
    if not cutoff > 0 or not variance > 0:
        raise ValueError(f"power_law_spectrum: need cutoff > 0 and variance > 0, got {cutoff}, {variance}")
    c, h, w = shape
    s = (cutoff**2 + frequencies(h, w)) ** (-exponent / 2)
    s = s * (variance / s.mean())
    return s.expand(c, h, w).clone()


@dataclass(frozen=True, eq=False)
class RandomFieldMixture:
    """Mixture of stationary Gaussian random fields on a ``(C, H, W)`` torus.

    Args:
        means: ``(K, C, H, W)`` templates ``m_k``.
        spectra: ``(K, C, H, W)`` per-frequency variances ``S_k > 0`` of the orthonormal DFT
            coefficients, symmetric (``S(f) = S(-f)``).
        weights: ``(K,)`` positive, normalised on construction.
        chunk: rows per block in the batched closed forms.

    Raises:
        ValueError: mismatched shapes, non-positive or asymmetric spectra, non-positive weights.
    """

    means: Tensor
    spectra: Tensor
    weights: Tensor
    chunk: int = 256

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=torch.float64)
        spectra = torch.as_tensor(self.spectra, dtype=torch.float64)
        weights = torch.as_tensor(self.weights, dtype=torch.float64).flatten()
        if means.ndim != 4 or spectra.shape != means.shape or weights.numel() != means.shape[0]:
            raise ValueError(f"means and spectra must be (K, C, H, W) and weights (K,); got {tuple(means.shape)}, "
                             f"{tuple(spectra.shape)}, {tuple(weights.shape)}")
        if not bool((spectra > 0).all()) or not bool((weights > 0).all()):
            raise ValueError("spectra and weights must be positive")
        if not torch.allclose(spectra, reflect(spectra), rtol=1e-12, atol=0.0):
            raise ValueError("spectra must be symmetric, S(f) = S(-f) (a real stationary field)")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "spectra", spectra)
        object.__setattr__(self, "weights", weights / weights.sum())
        object.__setattr__(self, "_mean_hat", _fft(means))
        half = means.shape[-1] // 2 + 1
        weight = torch.full((half,), 2.0, dtype=torch.float64)  # rfft columns stand for two
        weight[0] = 1.0
        if means.shape[-1] % 2 == 0:
            weight[-1] = 1.0
        object.__setattr__(self, "_half_weight", weight.expand(means.shape[1:-1] + (half,)).flatten())
        object.__setattr__(self, "_mean_half", torch.fft.rfft2(means, norm="ortho").flatten(1))

    @classmethod
    def example(cls, shape: tuple[int, int, int] = (4, 32, 32), components: int = 3, seed: int = 0,
                exponents: tuple[float, ...] = (3.0, 2.5, 3.5), template_scale: float = 1.0) -> "RandomFieldMixture":
        """A seeded mixture: component ``k`` has a power-law spectrum of exponent ``exponents[k %
        len]`` (unit pixel variance) and a smooth template (a low-pass random field of pixel std
        ``template_scale``); Dirichlet(4) weights."""
        g = torch.Generator().manual_seed(seed)
        c, h, w = shape
        smooth = power_law_spectrum(shape, exponent=6.0, cutoff=1.0)
        means, spectra = [], []
        for k in range(components):
            z = torch.randn(shape, generator=g, dtype=torch.float64)
            m = _ifft(smooth.sqrt() * _fft(z))
            means.append(m * (template_scale / m.std()))
            spectra.append(power_law_spectrum(shape, exponent=exponents[k % len(exponents)]))
        weights = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(components, 4.0)))
        return cls(torch.stack(means), torch.stack(spectra), weights)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    # ---- closed forms --------------------------------------------------------------------------
    def _check(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"samples must be (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        return x.to(torch.float64)

    def _blocks(self, x: Tensor, alpha, sigma):
        """Yield ``(rows, x_hat, parts)`` per chunk and per distinct ``(alpha, sigma)``:
        ``x_hat = rfft2(x)`` of those rows and the per-level tables of :meth:`_level`."""
        x64 = self._check(x)
        b = x64.shape[0]
        a, s = _as_batch(alpha, b), _as_batch(sigma, b)
        for lo in range(0, b, self.chunk):
            idx = torch.arange(lo, min(b, lo + self.chunk))
            pairs = torch.stack([a[idx].detach(), s[idx].detach()], 1)
            levels, inverse = torch.unique(pairs, dim=0, return_inverse=True)
            for j, (aj, sj) in enumerate(levels.tolist()):
                rows = idx[inverse == j]
                yield rows, torch.fft.rfft2(x64[rows], norm="ortho"), self._level(aj, sj)

    def _level(self, a: float, s: float) -> tuple[float, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-level tables on the half spectrum (``K`` rows, ``C * H * (W // 2 + 1)`` columns):
        ``(a, A = weight / v, A M (real, imag), const = log pi - 1/2 (a^2 sum A |M|^2 + sum log 2 pi v),
        G = a S / v, G M (stacked real, imag))``."""
        v = a * a * self.spectra + s * s  # (K, C, H, W)
        logdet = torch.log(2 * math.pi * v).sum((1, 2, 3))
        half = self.spectra.shape[-1] // 2 + 1
        vh = v[..., :half].flatten(1)
        mh = self._mean_half
        A = self._half_weight / vh
        const = torch.log(self.weights) - 0.5 * (a * a * (A * mh.abs().square()).sum(1) + logdet)
        G = a * self.spectra[..., :half].flatten(1) / vh
        return a, A, A * mh.real, A * mh.imag, const, G, torch.cat([G * mh.real, G * mh.imag], 1)

    def _log_comp(self, xh: Tensor, level) -> Tensor:
        """``log pi_k N(x_t; a m_k, a^2 C_k + s^2 I)``, ``(b, K)``, from ``xh = rfft2(x_t)``."""
        a, A, amr, ami, const, _, _ = level
        xf = xh.flatten(1)
        quad = xf.abs().square() @ A.T - 2 * a * (xf.real @ amr.T + xf.imag @ ami.T)
        return const[None] - 0.5 * quad

    def denoised(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Exact ``E[x0 | x_t = x]`` (``(B, C, H, W)``; ``alpha, sigma`` scalars or ``(B,)``); differentiable."""
        out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        pieces = []
        for rows, xh, level in self._blocks(x, alpha, sigma):
            w = torch.softmax(self._log_comp(xh, level), 1)
            a, G, gm = level[0], level[5], level[6]
            wg, wgm = w @ G, (w @ gm).chunk(2, 1)
            post = xh * wg.reshape(xh.shape) - a * torch.complex(wgm[0], wgm[1]).reshape(xh.shape)
            pieces.append((rows, (w @ self.means.flatten(1)).reshape(-1, *self.shape)
                           + torch.fft.irfft2(post, s=self.shape[-2:], norm="ortho")))
        if len(pieces) == 1 and len(pieces[0][0]) == x.shape[0]:
            return pieces[0][1].to(x.dtype)
        out = out.index_put((torch.cat([r for r, _ in pieces]),), torch.cat([p for _, p in pieces]))
        return out.to(x.dtype)

    def _per_row(self, x: Tensor, alpha, sigma) -> Tensor:
        """``(B, K)`` log joint of row and component, rows in input order."""
        out = torch.empty(x.shape[0], len(self.weights), dtype=torch.float64)
        for rows, xh, level in self._blocks(x, alpha, sigma):
            out[rows] = self._log_comp(xh, level)
        return out

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """Exact ``log p_t(x)``, shape ``(B,)`` (``sigma = 0``: the data density)."""
        return torch.logsumexp(self._per_row(x, alpha, sigma), 1)

    def component_posterior(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """``p(component k | x_t = x)``, shape ``(B, K)``."""
        return torch.softmax(self._per_row(x, alpha, sigma), 1)

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Exact ``grad_x log p_t(x) = (alpha D - x) / sigma^2``, shape of ``x``."""
        b = x.shape[0]
        a = _as_batch(alpha, b).reshape(-1, 1, 1, 1)
        s = _as_batch(sigma, b).reshape(-1, 1, 1, 1)
        return ((a * self.denoised(x, alpha, sigma).double() - x.double()) / s**2).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of ``p0``, ``(n, C, H, W)`` float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, *self.shape, generator=generator, dtype=torch.float64)
        return self.means[k] + _ifft(self.spectra[k].sqrt() * _fft(z))

    def cov_apply(self, v: Tensor, k: int) -> Tensor:
        """``C_k v`` for ``v`` of shape ``(..., C, H, W)``."""
        return _ifft(self.spectra[k] * _fft(v.to(torch.float64)))

    # ---- exact tilted targets --------------------------------------------------------------------
    def tilted_linear(self, a: Tensor, beta: float) -> "RandomFieldMixture":
        """The exact target ``∝ p0(x) exp(<a, x> / beta)`` (``a`` of shape ``(C, H, W)``):
        ``m'_k = m_k + C_k a / beta``, same spectra, ``pi'_k ∝ pi_k exp(<a, m_k> / beta +
        a^T C_k a / (2 beta^2))``."""
        if not beta > 0:
            raise ValueError(f"tilted_linear: beta must be > 0, got {beta}")
        a = torch.as_tensor(a, dtype=torch.float64).reshape(self.shape)
        ca = torch.stack([self.cov_apply(a, k) for k in range(len(self.weights))])
        logits = torch.log(self.weights) + (self.means * a).sum((1, 2, 3)) / beta + (ca * a).sum((1, 2, 3)) / (2 * beta**2)
        return RandomFieldMixture(self.means + ca / beta, self.spectra, torch.softmax(logits, 0), self.chunk)

    def tilted_quadratic(self, q: Tensor | float, c: Tensor | float, beta: float) -> "RandomFieldMixture":
        """The exact target ``∝ p0(x) exp(r(x) / beta)`` for ``r(x) = -1/2 (x - c)^T Q (x - c)``
        with a stationary ``Q`` (spectrum ``q > 0``, scalar or symmetric ``(C, H, W)``; ``q``
        scalar: ``Q = q I``): ``S'_k = 1 / (1 / S_k + q / beta)``, ``m'_k = S'_k (M_k / S_k + q
        C / beta)`` per frequency, ``pi'_k ∝ pi_k N(c; m_k, C_k + beta Q^-1)``."""
        if not beta > 0:
            raise ValueError(f"tilted_quadratic: beta must be > 0, got {beta}")
        q = torch.as_tensor(q, dtype=torch.float64).expand(self.shape)
        if not bool((q > 0).all()) or not torch.allclose(q, reflect(q), rtol=1e-12, atol=0.0):
            raise ValueError("tilted_quadratic: q must be positive and symmetric (a stationary Q > 0)")
        ch = _fft(torch.as_tensor(c, dtype=torch.float64).expand(self.shape))
        s_new = 1.0 / (1.0 / self.spectra + q / beta)
        m_new = _ifft(s_new * (self._mean_hat / self.spectra + q * ch / beta))
        v = self.spectra + beta / q
        log_n = -0.5 * ((ch - self._mean_hat).abs().square() / v + torch.log(2 * math.pi * v)).sum((1, 2, 3))
        return RandomFieldMixture(m_new, s_new, torch.softmax(torch.log(self.weights) + log_n, 0), self.chunk)

    # ---- moments -----------------------------------------------------------------------------------
    def linear_moments(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Exact mean ``(d,)`` and covariance ``(d, d)`` of ``P x``, ``x ~ p0``, for ``features``
        ``P`` of shape ``(d, C, H, W)``: ``sum_k pi_k (P C_k P^T + P m_k m_k^T P^T) - mu mu^T``."""
        p = torch.as_tensor(features, dtype=torch.float64)
        pf = p.flatten(1)
        pm = pf @ self.means.flatten(1).T  # (d, K)
        mean = pm @ self.weights
        cov = -torch.outer(mean, mean)
        for k, w in enumerate(self.weights):
            cov = cov + w * (pf @ self.cov_apply(p, k).flatten(1).T + torch.outer(pm[:, k], pm[:, k]))
        return mean, 0.5 * (cov + cov.T)

    def linear_reward_mean(self, a: Tensor) -> float:
        """``E[<a, x>]`` under ``p0``."""
        return float(self.weights @ (self.means * torch.as_tensor(a, dtype=torch.float64)).sum((1, 2, 3)))

    # ---- models ------------------------------------------------------------------------------------
    def denoiser(self, noise_schedule: NoiseSchedule) -> "FieldDenoiser":
        """The exact denoiser under ``noise_schedule`` as a diffsample ``Denoiser``."""
        return FieldDenoiser(self, noise_schedule)


def _as_batch(v: Tensor | float, b: int) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    return v.expand(b) if v.ndim == 0 else v.reshape(b)


class FieldDenoiser:
    """The exact field-mixture denoiser as a diffsample ``Denoiser``: ``(x, t, cond=None) ->
    denoised``, ``t`` of shape ``(B,)`` in ``noise_schedule`` time. Records one model evaluation per
    row; ``cond`` is ignored (unconditional)."""

    def __init__(self, field: RandomFieldMixture, noise_schedule: NoiseSchedule) -> None:
        self.field = field
        self.noise_schedule = noise_schedule

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        add_model_evals(x.shape[0])
        t64 = t.to(torch.float64)
        return self.field.denoised(x, self.noise_schedule.alpha(t64), self.noise_schedule.sigma(t64))


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``: the 2-Wasserstein distance
    squared between two Gaussians (the FID formula, Heusel et al., arXiv 1706.08500)."""
    from scipy import linalg

    c1, c2 = cov1.double().numpy(), cov2.double().numpy()
    w, v = np.linalg.eigh(c1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = linalg.sqrtm(r1 @ c2 @ r1)
    cross = np.real(cross)
    d = (mean1 - mean2).double()
    return float(d @ d) + float(np.trace(c1) + np.trace(c2) - 2 * np.trace(cross))
