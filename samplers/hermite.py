"""Hermite spectrum of samples: the collapse diagnostic of recursive retraining with truncation.

Under the Ornstein-Uhlenbeck (VP) forward process, the degree-``n`` Hermite moment of any unit-norm
1-D projection ``z = w . x`` is multiplied by ``e^{-n tau / 2}`` over OU time ``tau`` (Mehler), so a
truncated sampler acts as a low-pass filter on these moments, and recursive retraining on its own
samples compounds the filter (Khelifa, Turner & Venkataramanan, arXiv 2606.13796;
docs/methods/truncation.md). :func:`hermite_spectrum` measures the normalised moments
``m_n = E[He_n(z)] / sqrt(n!)`` over a set of directions, their ratios to a reference with standard
errors, and the energy spectrum; :func:`fit_t0` turns the ratios into an effective truncation time.

Samples must be in the diffusion's own coordinates (the normalisation the model sees: VP native
space, where the prior is ``N(0, I)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

BASES = ("random", "axes", "dct")


def _as_2d(samples) -> tuple[np.ndarray, tuple[int, ...]]:
    x = samples.detach().cpu().to(torch.float64).numpy() if isinstance(samples, Tensor) else np.asarray(samples, float)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"samples must have shape (N, *dims) with N >= 2, got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("samples must be finite")
    return x.reshape(x.shape[0], -1), tuple(x.shape[1:])


def _dct_1d(length: int, k: int) -> np.ndarray:
    """Orthonormal DCT-II basis vector ``k`` of the given length."""
    j = np.arange(length)
    v = np.cos(math.pi * (j + 0.5) * k / length)
    return v / np.linalg.norm(v)


def directions(dims: tuple[int, ...], n_dirs: int = 64, basis: str = "random", seed: int = 0) -> np.ndarray:
    """Unit directions ``(M, D)`` in the flattened sample space of shape ``dims`` (``D = prod(dims)``).

    * ``"random"``: ``n_dirs`` Gaussian directions, normalised (seeded);
    * ``"axes"``: coordinate axes (all when ``n_dirs >= D``, else ``n_dirs`` evenly spaced);
    * ``"dct"``: the lowest-frequency orthonormal DCT-II vectors (2-D per channel for image samples
      ``(C, H, W)``, ordered by ``u + v`` then channel; 1-D over the flattened vector otherwise),
      the DC component first; ``min(n_dirs, D)`` of them.

    Raises:
        ValueError: unknown basis or ``n_dirs < 1``.
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {', '.join(BASES)} or an (M, D) array; got {basis!r}")
    if isinstance(n_dirs, bool) or not isinstance(n_dirs, (int, np.integer)) or n_dirs < 1:
        raise ValueError(f"n_dirs must be an integer >= 1, got {n_dirs!r}")
    d = int(np.prod(dims))
    if basis == "random":
        w = np.random.default_rng(seed).standard_normal((n_dirs, d))
        return w / np.linalg.norm(w, axis=1, keepdims=True)
    if basis == "axes":
        idx = np.arange(d) if n_dirs >= d else np.unique(np.linspace(0, d - 1, n_dirs).round().astype(int))
        return np.eye(d)[idx]
    m = min(n_dirs, d)
    if len(dims) == 3:
        c, h, w_ = dims
        freqs = sorted(((u + v, u, v, ch) for u in range(h) for v in range(w_) for ch in range(c)))[:m]
        out = np.zeros((m, d))
        for r, (_, u, v, ch) in enumerate(freqs):
            plane = np.zeros((c, h, w_))
            plane[ch] = np.outer(_dct_1d(h, u), _dct_1d(w_, v))
            out[r] = plane.ravel()
        return out
    return np.stack([_dct_1d(d, k) for k in range(m)])


def _features(z: np.ndarray, n_max: int):
    """Yield ``h_n(z) = He_n(z) / sqrt(n!)`` for ``n = 0..n_max`` (three-term recursion)."""
    prev, cur = None, np.ones_like(z)
    for n in range(n_max + 1):
        yield cur
        nxt = z * cur / math.sqrt(n + 1) - (math.sqrt(n / (n + 1)) * prev if prev is not None else 0.0)
        prev, cur = cur, nxt


@dataclass(frozen=True)
class HermiteSpectrum:
    """Result of :func:`hermite_spectrum`; ``K = n_max + 1`` degrees, ``M`` directions.

    Attributes:
        degrees: ``(K,)`` the degrees ``0..n_max``.
        directions: ``(M, D)`` the unit directions used.
        n_samples: number of samples ``N``.
        moments: ``(K, M)`` normalised moments ``m_n = mean He_n(w . x) / sqrt(n!)``.
        se: ``(K, M)`` their standard errors (sample std over ``sqrt(N)``).
        cov: ``(K, M, M)`` covariance over samples of the features ``He_n(w . x) / sqrt(n!)``
            across directions (for pooled ratios).
        energy: ``(K,)`` energy spectrum ``E_n = mean over directions of m_n^2``.
        energy_noise: ``(K,)`` mean of ``se^2`` over directions, the sampling bias of ``energy``.
        ref_moments, ref_se: ``(K, M)`` the reference's moments and standard errors (``None``
            without a reference).
        ratio, ratio_se: ``(K, M)`` per-direction ratios ``m_n / m_n(ref)`` and their delta-method
            standard errors.
        mask: ``(K, M)`` directions where the reference moment is resolved, ``|m_n(ref)| >= 3 SE``.
        ratio_n, ratio_n_se: ``(K,)`` the pooled ratio per degree over the masked directions,
            ``sum_d c_d m_nd / sum_d c_d m_nd(ref)`` with ``c = m(ref)``, and its standard error
            (correlations between directions included); NaN where no direction is resolved.
    """

    degrees: np.ndarray
    directions: np.ndarray
    n_samples: int
    moments: np.ndarray
    se: np.ndarray
    cov: np.ndarray
    energy: np.ndarray
    energy_noise: np.ndarray
    ref_moments: np.ndarray | None = None
    ref_se: np.ndarray | None = None
    ratio: np.ndarray | None = None
    ratio_se: np.ndarray | None = None
    mask: np.ndarray | None = None
    ratio_n: np.ndarray | None = None
    ratio_n_se: np.ndarray | None = None


def hermite_spectrum(samples, ref=None, n_max: int = 8, n_dirs: int = 64, basis="random",
                     seed: int = 0) -> HermiteSpectrum:
    """Per-degree Hermite moments of 1-D projections of ``samples`` (arXiv 2606.13796 diagnostic).

    Args:
        samples: ``(N, *dims)`` tensor or array in the model's own coordinates, ``N >= 2``.
        ref: reference samples ``(N_ref, *dims)`` (e.g. the training data) or a
            :class:`HermiteSpectrum` computed with the same directions; adds ratios.
        n_max: highest degree (>= 1).
        n_dirs: number of directions (see :func:`directions`).
        basis: ``"random"``, ``"axes"``, ``"dct"`` or an explicit ``(M, D)`` array of directions
            (normalised here).
        seed: seed of the random directions.

    Returns:
        A :class:`HermiteSpectrum`. Cost ``O(N D M + N M^2 K)`` on the CPU.

    Raises:
        ValueError: bad shapes, non-finite samples, ``n_max < 1``, unknown basis, or a reference
            spectrum whose directions differ.
    """
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be an integer >= 1, got {n_max!r}")
    x, dims = _as_2d(samples)
    if isinstance(basis, str):
        w = directions(dims, n_dirs, basis, seed)
    else:
        w = np.asarray(basis.detach().cpu().numpy() if isinstance(basis, Tensor) else basis, dtype=float)
        if w.ndim != 2 or w.shape[1] != x.shape[1]:
            raise ValueError(f"basis array must have shape (M, {x.shape[1]}), got {tuple(w.shape)}")
        w = w / np.linalg.norm(w, axis=1, keepdims=True)
    n = x.shape[0]
    z = x @ w.T
    k = int(n_max) + 1
    moments = np.empty((k, w.shape[0]))
    cov = np.empty((k, w.shape[0], w.shape[0]))
    for deg, h in enumerate(_features(z, int(n_max))):
        moments[deg] = h.mean(0)
        hc = h - moments[deg]
        cov[deg] = hc.T @ hc / (n - 1)
    se = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None) / n)
    out = dict(degrees=np.arange(k), directions=w, n_samples=n, moments=moments, se=se, cov=cov,
               energy=(moments**2).mean(1), energy_noise=(se**2).mean(1))
    if ref is None:
        return HermiteSpectrum(**out)
    if not isinstance(ref, HermiteSpectrum):
        ref = hermite_spectrum(ref, None, n_max=int(n_max), basis=w)
    if ref.directions.shape != w.shape or not np.allclose(ref.directions, w) or ref.moments.shape[0] < k:
        raise ValueError("ref spectrum was computed with other directions or fewer degrees; pass the same basis")
    f, fse, fcov = ref.moments[:k], ref.se[:k], ref.cov[:k]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = moments / f
        ratio_se = np.sqrt(se**2 / f**2 + moments**2 * fse**2 / f**4)
    mask = np.abs(f) >= 3 * fse
    ratio_n = np.full(k, np.nan)
    ratio_n_se = np.full(k, np.nan)
    for deg in range(k):
        c = np.where(mask[deg], f[deg], 0.0)
        if not c.any():
            continue
        num, den = float(c @ moments[deg]), float(c @ f[deg])
        var_num = float(c @ cov[deg] @ c) / n
        var_den = float(c @ fcov[deg] @ c) / ref.n_samples
        ratio_n[deg] = num / den
        ratio_n_se[deg] = math.sqrt(var_num / den**2 + num**2 * var_den / den**4)
    return HermiteSpectrum(**out, ref_moments=f, ref_se=fse, ratio=ratio, ratio_se=ratio_se, mask=mask,
                           ratio_n=ratio_n, ratio_n_se=ratio_n_se)


class T0Fit(NamedTuple):
    """Result of :func:`fit_t0`: ``log|ratio_n| ~ -n t0 / 2 + intercept``."""

    t0: float
    t0_se: float
    intercept: float


def fit_t0(ratios, degrees=None, se=None, intercept: bool = True) -> T0Fit:
    """Effective truncation time from Hermite ratios: weighted least squares on
    ``log|ratio_n| = -n t0 / 2 + c`` (arXiv 2606.13796; a single truncated sampling step gives
    ``ratio_n = e^{-n t0/2}``, ``c = 0``; a collapsed retraining loop gives a positive slope
    ``t0`` as a collapse indicator).

    Args:
        ratios: ``(K,)`` ratios per degree, or a :class:`HermiteSpectrum` with a reference (its
            pooled ``ratio_n`` / ``ratio_n_se``, degrees ``>= 1`` that are resolved).
        degrees: ``(K,)`` degrees (default ``1..K`` for an array).
        se: ``(K,)`` standard errors of the ratios (weights ``(ratio / se)^2``); ``None``: equal weights.
        intercept: fit ``c`` (else ``c = 0``).

    Returns:
        :class:`T0Fit` ``(t0, t0_se, intercept)``; ``t0_se`` is NaN without ``se``.

    Raises:
        ValueError: fewer than 2 usable degrees (1 without intercept), mismatched lengths.
    """
    if isinstance(ratios, HermiteSpectrum):
        if ratios.ratio_n is None:
            raise ValueError("fit_t0 needs a spectrum computed with a ref")
        r, s, d = ratios.ratio_n, ratios.ratio_n_se, ratios.degrees.astype(float)
    else:
        r = np.asarray(ratios, dtype=float).ravel()
        d = np.arange(1, r.size + 1, dtype=float) if degrees is None else np.asarray(degrees, dtype=float).ravel()
        s = None if se is None else np.asarray(se, dtype=float).ravel()
        if d.size != r.size or (s is not None and s.size != r.size):
            raise ValueError(f"ratios, degrees and se must have the same length, got {r.size}, {d.size}, "
                             f"{None if s is None else s.size}")
    ok = np.isfinite(r) & (r != 0) & (d >= 1)
    if s is not None:
        ok &= np.isfinite(s) & (s > 0)
    if ok.sum() < (2 if intercept else 1):
        raise ValueError(f"fit_t0 needs at least {2 if intercept else 1} usable degrees, got {int(ok.sum())}")
    y = np.log(np.abs(r[ok]))
    a = np.stack([-d[ok] / 2] + ([np.ones(ok.sum())] if intercept else []), axis=1)
    wts = np.ones(ok.sum()) if s is None else (np.abs(r[ok]) / s[ok]) ** 2
    aw = a * np.sqrt(wts)[:, None]
    coef, *_ = np.linalg.lstsq(aw, y * np.sqrt(wts), rcond=None)
    t0_se = math.nan
    if s is not None:
        t0_se = float(np.sqrt(np.linalg.inv(aw.T @ aw)[0, 0]))
    return T0Fit(float(coef[0]), t0_se, float(coef[1]) if intercept else 0.0)
