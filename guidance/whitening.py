"""The whitening operator ``W`` of NoiseTilt / NTRK (arXiv 2606.18066, section "whitening").

``W`` maps a structured vector (a reward gradient) to a vector in the typical set of
``N(0, I_N)``, keeping its direction as far as possible, so that NTRK can blend it with fresh noise
(``sqrt(rho) W(g) + sqrt(1 - rho) eps``). The typical set is approximated by an intersection of
high-confidence sets of order statistics of i.i.d. ``N(0, 1)`` variables, each at level ``alpha``
(two-sided, ``alpha / 2`` per side), and ``W`` alternates Euclidean projections onto them.

Sources (docs/methods/noisetilt.md#the-whitening-operator-w): the goal
and the building blocks (2OS "two-level order statistics" projection, tile means and energies, an
orthogonal frequency domain, ``alpha = 1e-4``) follow the paper's published description; the
bound formulas are derived here; the composition (standardize first, 8x8 tiles, value and
orthonormal DCT-II domains, 3 alternations, 2OS iterated to its fixed point) is diffsample's
reconstruction, the paper's Appendix B being unavailable. Two further choices here are also ours:

* standardization removes only the atypical part of the mean (full centering moves typical noise:
  ``cos`` drops by ``z^2 / 2N`` for a row mean of ``z`` standard errors, 2e-4 at ``N = 16384``);
* it is re-applied (``|x|^2 = N``) at the start of every domain projection. Without it the
  projections only shrink a structured input, ending at ``|W(g)|^2 / N ~ 0.95-0.97`` (outside the
  ``chi2_N`` typical range) and 1-2 % away from ``W(W(g))`` whatever the number of alternations.

Known limits (measured in ``tests/guidance/test_whitening.py``, N = 4x64x64): the sets are
invariant under permuting tiles, so the few frequency tiles holding a smooth field keep the
top-rank energy bounds (~1.7x energy per coefficient). A band-energy test that knows where the low
frequencies are still rejects ``W(g)``: low/high energy per coefficient 1.3-1.9 where
``F(1024, 4096)`` allows 0.82-1.21 at 1e-4. A pure smooth field also fails a KS test vs
``N(0, 1)`` (p ~ 1e-6; the source's own run reports 1e-7); with some white noise added it passes.

Layouts. Images ``(B, C, H, W)`` with ``H`` and ``W`` multiples of ``tile``: tiles are
``tile x tile`` patches per channel (``D = tile**2``), and the frequency domain is the orthonormal
2-D DCT-II per channel, tiled the same way (frequency blocks). Anything else is flattened per row to
length ``N``: tiles are contiguous chunks of ``D`` entries, ``D`` the largest divisor of ``N`` not
above ``tile**2`` (so ``D = 1``, plain 1-D order statistics, when ``N`` is prime), and the frequency
domain is the orthonormal 1-D DCT-II of the row. DCTs use one FFT per axis (``O(N log N)``; an
``N x N`` float64 matrix would take 32 GiB for a flattened 16x64x64 latent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import special, stats
from torch import Tensor

_TOL = 1e-7  # 2OS fixed point: max entry change, on the unit-variance (standardized) scale


DOMAINS = ("dct", "rfft")


def whiten(g: Tensor, *, tile: int = 8, alpha: float = 1e-4, alternations: int = 3, max_passes: int = 10,
           domain: str = "dct") -> Tensor:
    """``W``: maps each row of ``g`` (``(B, *dims)``) to a vector in the typical set of
    ``N(0, I_N)``, ``N = prod(dims)``, keeping its direction as far as possible.

    Per row (rows are independent): ``alternations`` rounds of (value-domain projection, DCT-domain
    projection), then a final value-domain projection. A domain projection

    * standardizes the row: subtracts the part of its mean beyond ``Phi^-1(1 - alpha/2)`` standard
      errors, rescales to ``|x|^2 = N`` (so ``W(c g) = W(g)`` for ``c > 0``);
    * tiles the row, in the domain, into ``(M, D)`` (layouts: module docstring);
    * tile means: ``sqrt(D) * mean_i ~ N(0, 1)``; sort over the ``M`` tiles, clip the r-th smallest
      into its 1-D order-statistic bounds, shift each tile by the change;
    * tile energies: ``E_i = |tile_i|^2 ~ chi2_D``; ``Phi^-1(F_chi2(E_i))`` clipped the same way
      (equivalently: the sorted energies clipped into ``chi2_D`` quantiles), rescale each tile;
    * 2OS: :func:`project_2os` repeated per row until no entry moves by more than 1e-7 (at most
      ``max_passes``); once converged, the sorted table lies within :func:`order_stat_bounds`.

    Typical noise passes almost unchanged (cos > 0.999998, up to the rescale to ``|x|^2 = N``).
    ``W`` is a fixed point only once the alternations have converged: ``|W(W(g)) - W(g)| / |W(g)|``
    is ~1e-15 for noise and, for smooth fields, up to ~1e-2 with 3 alternations, ~1e-4 with 10.

    Args:
        g: ``(B, *dims)``, floating point, any device; detached (no gradient flows through ``W``).
        tile: tile side for images, ``tile**2`` the tile length otherwise.
        alpha: two-sided level of every order-statistic interval.
        alternations: rounds of (value, DCT) projections before the final value projection.
        max_passes: cap on 2OS passes per domain projection.
        domain: ``"dct"`` (default: the layouts of the module docstring) or ``"rfft"``: the
            WGNC-style layout of the same group's earlier whitening (arXiv 2602.08646): every row
            flattened, tiles of ``tile**2`` contiguous entries (16 for ``tile=4``) in the value
            domain and in the orthonormal real FFT of the flattened row (:func:`rfft_real`).

    Returns:
        ``(B, *dims)`` in ``g``'s dtype and device, computed in float64. A constant row (e.g. an
        all-zero gradient) has no direction to keep and maps to an all-zero row, which is *not*
        typical: the caller must treat it as "no guidance signal" (e.g. ``rho = 0`` for that row).

    Raises:
        ValueError: ``alpha`` not in (0, 1), ``tile < 1``, ``alternations < 0``,
            ``max_passes < 1``, ``g`` not floating, with fewer than 2 dims or fewer than 2 entries
            per row, or a row with non-finite entries (the first one is named).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"whiten: alpha must be in (0, 1), got {alpha}")
    if tile < 1 or alternations < 0 or max_passes < 1:
        raise ValueError(f"whiten: need tile >= 1, alternations >= 0, max_passes >= 1; "
                         f"got {tile}, {alternations}, {max_passes}")
    if domain not in DOMAINS:
        raise ValueError(f"whiten: unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    if g.ndim < 2 or math.prod(g.shape[1:]) < 2 or not g.is_floating_point():
        raise ValueError(f"whiten: g must be a floating (B, *dims) tensor with >= 2 entries per row, "
                         f"got {g.dtype} {tuple(g.shape)}")
    x = g.detach().to(torch.float64).reshape(g.shape[0], math.prod(g.shape[1:]))
    bad = (~torch.isfinite(x).all(1)).nonzero()
    if len(bad):
        raise ValueError(f"whiten: row {int(bad[0])} of g has non-finite entries")
    out = torch.zeros_like(x)
    live = x.amax(1) > x.amin(1)  # constant rows stay zero
    if live.any():
        dims = tuple(g.shape[1:])
        grid = _grid(dims, tile) if domain == "dct" else _grid((math.prod(dims),), tile, rfft=True)
        bounds = _bounds(grid.m, grid.d, float(alpha), x.device)
        y = x[live].reshape(-1, *grid.shape)
        for _ in range(alternations):
            for freq in (False, True):
                y = _project_domain(y, grid, bounds, max_passes, freq)
        out[live] = _project_domain(y, grid, bounds, max_passes, freq=False).flatten(1)
    return out.reshape(g.shape).to(g.dtype)


def order_stat_bounds(m: int, d: int, alpha: float) -> tuple[Tensor, Tensor]:
    """2OS bound tables ``L, U`` (``(m, d)``, float64): ``[L[r, j], U[r, j]]`` is the central
    ``1 - alpha`` interval of ``Z[r, j]``, the (r+1)-th smallest over ``m`` tiles of each tile's
    (j+1)-th smallest of ``d`` i.i.d. ``N(0, 1)`` entries (derived in docs/methods/noisetilt.md#the-whitening-operator-w):
    ``Phi^-1(I^-1(I^-1(q; r, m-r+1); j, d-j+1))``, ``q = alpha/2`` and ``1 - alpha/2``, 1-based
    ``r, j``. ``d = 1`` gives the 1-D order statistics of ``m`` samples, ``m = 1`` those of ``d``.
    Cached per ``(m, d, alpha)``: do not modify the returned tensors."""
    return _order_stat_bounds(int(m), int(d), float(alpha))


@lru_cache(maxsize=64)
def _order_stat_bounds(m: int, d: int, alpha: float) -> tuple[Tensor, Tensor]:
    j = np.arange(1, d + 1)
    lo, hi = (torch.from_numpy(special.ndtri(special.betaincinv(j, d - j + 1, q[:, None])))
              for q in _rank_quantiles(m, alpha))
    return lo, hi


def _rank_quantiles(m: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``alpha/2`` and ``1 - alpha/2`` quantiles of ``U_(r)`` (r-th smallest of ``m`` uniforms)."""
    r = np.arange(1, m + 1)
    return special.betaincinv(r, m - r + 1, alpha / 2), special.betaincinv(r, m - r + 1, 1 - alpha / 2)


def project_2os(y: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """One 2OS pass on ``y`` (``(B, M, D)``): sort each tile, sort each column across tiles, clamp
    the result into ``[lower, upper]`` (``(M, D)``, ``y``'s dtype and device), undo both sorts.
    The identity on inputs whose sorted table already lies within the bounds; a single pass can
    break a tile's order, so it is the projection onto ``{L <= Z <= U}`` only once iterated to its
    fixed point."""
    ys, p1 = y.sort(dim=-1, stable=True)
    z, p0 = ys.sort(dim=-2, stable=True)
    ys = torch.empty_like(ys).scatter_(-2, p0, torch.clamp(z, lower, upper))
    return torch.empty_like(y).scatter_(-1, p1, ys)


@dataclass(frozen=True)
class _Bounds:
    """All tables of one ``(M, D, alpha)`` on one device: 2OS (``(M, D)``), sorted scaled tile
    means (``(M,)``, 1-D normal order statistics) and sorted tile energies (``(M,)``, chi2_D)."""

    lo: Tensor
    hi: Tensor
    mean_lo: Tensor
    mean_hi: Tensor
    energy_lo: Tensor
    energy_hi: Tensor
    z: float  # Phi^-1(1 - alpha/2)


@lru_cache(maxsize=64)
def _bounds(m: int, d: int, alpha: float, device: torch.device) -> _Bounds:
    # Phi^-1(F_chi2(E)) is increasing in E, so clipping it at Phi^-1(q) == clipping E at F_chi2^-1(q)
    energy = (torch.from_numpy(stats.chi2.ppf(q, d)) for q in _rank_quantiles(m, alpha))
    tables = (*order_stat_bounds(m, d, alpha), *(t[:, 0] for t in order_stat_bounds(m, 1, alpha)), *energy)
    return _Bounds(*(t.to(device=device, dtype=torch.float64) for t in tables), float(special.ndtri(1 - alpha / 2)))


def _clip_sorted(s: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """1-D order-statistic clip along the last dim (exact projection: monotone bounds keep order)."""
    z, p = s.sort(dim=-1, stable=True)
    return torch.empty_like(s).scatter_(-1, p, torch.clamp(z, lo, hi))


def _project_means(a: Tensor, b: _Bounds) -> Tensor:
    root_d = math.sqrt(a.shape[-1])
    s = a.mean(-1) * root_d
    return a + ((_clip_sorted(s, b.mean_lo, b.mean_hi) - s) / root_d).unsqueeze(-1)


def _project_energies(a: Tensor, b: _Bounds) -> Tensor:
    e = a.square().sum(-1)
    return a * (_clip_sorted(e, b.energy_lo, b.energy_hi) / e.clamp_min(1e-300)).sqrt().unsqueeze(-1)


def _project_2os_fixed(a: Tensor, b: _Bounds, max_passes: int) -> Tensor:
    """:func:`project_2os` repeated per row until no entry moves by more than ``_TOL``."""
    rows = torch.arange(a.shape[0], device=a.device)
    for _ in range(max_passes):
        if not len(rows):
            break
        old = a[rows]
        new = project_2os(old, b.lo, b.hi)
        a = a.index_copy(0, rows, new)
        rows = rows[(new - old).abs().amax((1, 2)) > _TOL]
    return a


def _standardize(x: Tensor, b: _Bounds) -> Tensor:
    """Remove the atypical part of each row's mean (``sqrt(N) * mean / std`` clipped into
    ``+-Phi^-1(1 - alpha/2)``; full centering would move typical noise), then rescale to
    ``|x|^2 = N``. Rows must be non-constant."""
    flat = x.flatten(1)
    std, mean = torch.std_mean(flat, 1, correction=0, keepdim=True)
    keep = b.z * std / math.sqrt(flat.shape[1])
    flat = flat - (mean - torch.clamp(mean, -keep, keep))
    return (flat * flat.square().mean(1, keepdim=True).rsqrt()).view_as(x)


def _project_domain(x: Tensor, grid: _Grid, b: _Bounds, max_passes: int, freq: bool) -> Tensor:
    x = _standardize(x, b)
    a = grid.tiles(grid.dct(x) if freq else x)
    a = _project_2os_fixed(_project_energies(_project_means(a, b), b), b, max_passes)
    x = grid.untiles(a)
    return grid.dct(x, inverse=True) if freq else x


@dataclass(frozen=True)
class _Grid:
    """Per-row layout: ``shape`` is ``(C, H, W)`` (image, ``side x side`` tiles) or ``(N,)``
    (flat, tiles of ``side`` contiguous entries)."""

    shape: tuple[int, ...]
    side: int
    rfft: bool = False  # frequency domain: the packed real FFT of the flat row instead of the DCT

    @property
    def image(self) -> bool:
        return len(self.shape) == 3

    @property
    def d(self) -> int:
        return self.side**2 if self.image else self.side

    @property
    def m(self) -> int:
        return math.prod(self.shape) // self.d

    def tiles(self, x: Tensor) -> Tensor:
        if not self.image:
            return x.reshape(-1, self.m, self.d)
        (c, h, w), t = self.shape, self.side
        return x.reshape(-1, c, h // t, t, w // t, t).transpose(3, 4).reshape(-1, self.m, self.d)

    def untiles(self, a: Tensor) -> Tensor:
        if not self.image:
            return a.reshape(-1, *self.shape)
        (c, h, w), t = self.shape, self.side
        return a.reshape(-1, c, h // t, w // t, t, t).transpose(3, 4).reshape(-1, c, h, w)

    def dct(self, x: Tensor, inverse: bool = False) -> Tensor:
        if self.rfft:
            return rfft_real(x, inverse)
        x = _dct(x, inverse)
        return _dct(x.transpose(-1, -2), inverse).transpose(-1, -2) if self.image else x


def _grid(dims: tuple[int, ...], tile: int, rfft: bool = False) -> _Grid:
    if len(dims) == 3 and dims[1] % tile == 0 and dims[2] % tile == 0 and not rfft:
        return _Grid(dims, tile)
    n = math.prod(dims)
    return _Grid((n,), max(k for k in range(1, min(n, tile * tile) + 1) if n % k == 0), rfft)


def rfft_real(x: Tensor, inverse: bool = False) -> Tensor:
    """Orthonormal real FFT of the last dim, packed into ``n`` reals: ``Re X_0``, then
    ``sqrt(2) Re X_k, sqrt(2) Im X_k`` for ``0 < k < n / 2``, then ``Re X_{n/2}`` for even ``n``
    (``X = torch.fft.rfft(x, norm="ortho")``). An orthogonal map, so ``N(0, I)`` stays ``N(0, I)``;
    ``inverse=True`` undoes it."""
    n = x.shape[-1]
    half = (n - 1) // 2
    r2 = math.sqrt(2.0)
    if not inverse:
        f = torch.fft.rfft(x, norm="ortho")
        parts = [f[..., :1].real, torch.stack([f[..., 1:half + 1].real, f[..., 1:half + 1].imag], -1).flatten(-2) * r2]
        if n % 2 == 0:
            parts.append(f[..., n // 2:n // 2 + 1].real)
        return torch.cat(parts, -1)
    pairs = x[..., 1:1 + 2 * half].unflatten(-1, (half, 2)) / r2
    body = torch.complex(pairs[..., 0], pairs[..., 1])
    zero = torch.zeros_like(x[..., :1])
    parts = [torch.complex(x[..., :1], zero), body]
    if n % 2 == 0:
        parts.append(torch.complex(x[..., -1:], zero))
    return torch.fft.irfft(torch.cat(parts, -1), n=n, norm="ortho")


def _dct(x: Tensor, inverse: bool = False) -> Tensor:
    """Orthonormal DCT-II along the last dim (``scipy.fft.dct(x, norm="ortho")``), or its inverse
    (orthonormal DCT-III), through one length-n FFT (Makhoul 1980)."""
    n = x.shape[-1]
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    scale = torch.full_like(k, math.sqrt(2 * n))  # unnormalized / orthonormal coefficient
    scale[0] = 2 * math.sqrt(n)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    if not inverse:
        v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], -1)
        return 2 * (torch.fft.fft(v) * twiddle).real / scale
    y = x * scale  # unnormalized DCT-II coefficients X_k; V_k = (X_k - i X_{n-k}) / 2 * conj(twiddle_k)
    y_rev = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], -1)
    v = torch.fft.ifft(torch.complex(y, -y_rev) / 2 * twiddle.conj()).real
    half = (n + 1) // 2
    out = torch.empty_like(x)
    out[..., ::2], out[..., 1::2] = v[..., :half], v[..., half:].flip(-1)
    return out
