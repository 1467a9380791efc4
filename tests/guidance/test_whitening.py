"""The NTRK whitening operator ``W`` (docs/methods/noisetilt.md#the-whitening-operator-w).

Exact-distribution checks: bound tables against Monte Carlo order statistics, outputs against
N(0, 1) (KS), chi2 / F band energies and the chi2_N norm range. Two checks the reconstruction is
known to fail are kept as strict xfails (they turn into errors if ``W`` starts passing them).
"""

import math
import time

import pytest
import scipy.fft
import torch
from scipy import stats

from diffsample.guidance.whitening import (_bounds, _dct, _grid, _project_2os_fixed, order_stat_bounds, project_2os,
                                           whiten)

F64 = torch.float64


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double())


def _rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


def _smooth(b, c=4, h=64, seed=1, waves=6):
    """Sum of low-frequency sinusoids (0-3 cycles per side, random amplitude and phase) per channel."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(h, dtype=F64), indexing="ij")
    out = torch.zeros(b, c, h, h, dtype=F64)
    for _ in range(waves):
        u, v = (torch.randint(0, 4, (b, c, 1, 1), generator=g) for _ in range(2))
        phase = 2 * math.pi * torch.rand(b, c, 1, 1, generator=g, dtype=F64)
        amplitude = torch.randn(b, c, 1, 1, generator=g, dtype=F64)
        out += amplitude * torch.sin(2 * math.pi * (u * xx + v * yy) / h + phase)
    return out


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _field(weight, seed=1):
    """Smooth field plus ``weight`` times white noise, (4, 4, 64, 64): N = 16384."""
    s = _smooth(4, seed=seed)
    return s + weight * _noise(s.shape, seed=seed + 100)


def _lag1(x):
    """Lag-1 autocorrelation along W and along H, per row, of (B, C, H, W)."""
    x = x - x.mean((-1, -2), keepdim=True)
    e = x.square().sum((1, 2, 3))
    return (x[..., 1:] * x[..., :-1]).sum((1, 2, 3)) / e, (x[..., 1:, :] * x[..., :-1, :]).sum((1, 2, 3)) / e


def _dct2(x):
    return _dct(_dct(x).transpose(-1, -2)).transpose(-1, -2)


# ---- bound tables -----------------------------------------------------------------------------


def test_bounds_are_ordered_monotone_symmetric_and_cached():
    lo, hi = order_stat_bounds(256, 64, 1e-4)
    assert lo.shape == hi.shape == (256, 64) and lo.dtype == hi.dtype == F64
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert (lo < hi).all()
    for t in (lo, hi):
        assert (t.diff(dim=0) > 0).all() and (t.diff(dim=1) > 0).all()
    # N(0, 1) is symmetric: U[r, j] = -L[M-1-r, D-1-j]
    assert torch.allclose(hi, -lo.flip(0, 1), atol=1e-8)
    assert order_stat_bounds(256, 64, 1e-4)[0] is lo  # lru_cache
    # higher confidence = wider intervals
    lo2, hi2 = order_stat_bounds(256, 64, 1e-2)
    assert (lo < lo2).all() and (hi > hi2).all()


@pytest.mark.parametrize("m,d", [(1, 16), (12, 1), (4, 8)])
def test_bounds_match_monte_carlo_order_statistics(m, d):
    """alpha = 0.1: L and U are the 5 % and 95 % quantiles of Z = sort_0(sort_1(Y)); m = 1 is the
    1-D order statistics of d samples, d = 1 those of m samples."""
    lo, hi = order_stat_bounds(m, d, 0.1)
    y = _noise((100_000, m, d), seed=3)
    z = y.sort(dim=-1).values.sort(dim=-2).values
    q = torch.quantile(z.flatten(1), torch.tensor([0.05, 0.95], dtype=F64), dim=0).view(2, m, d)
    assert (q[0] - lo).abs().max() < 0.015
    assert (q[1] - hi).abs().max() < 0.015


def test_tile_mean_and_energy_bounds_match_monte_carlo():
    m, d = 6, 8
    b = _bounds(m, d, 0.1, torch.device("cpu"))
    assert torch.equal(b.mean_lo, order_stat_bounds(m, 1, 0.1)[0][:, 0])
    y = _noise((100_000, m, d), seed=4)
    p = torch.tensor([0.05, 0.95], dtype=F64)
    means = (y.mean(-1) * math.sqrt(d)).sort(dim=-1).values
    energies = y.square().sum(-1).sort(dim=-1).values
    qm, qe = torch.quantile(means, p, dim=0), torch.quantile(energies, p, dim=0)
    assert (qm[0] - b.mean_lo).abs().max() < 0.015 and (qm[1] - b.mean_hi).abs().max() < 0.015
    assert ((qe[0] - b.energy_lo) / d).abs().max() < 0.01 and ((qe[1] - b.energy_hi) / d).abs().max() < 0.01


# ---- 2OS projection ---------------------------------------------------------------------------


def test_project_2os_is_identity_inside_the_bounds():
    lo, hi = order_stat_bounds(16, 64, 1e-4)
    g = torch.Generator().manual_seed(5)
    z = lo + (hi - lo) * torch.rand(16, 64, generator=g, dtype=F64)
    z = z.sort(dim=1).values.sort(dim=0).values  # a sorted table inside the bounds (bounds are monotone)
    assert ((z >= lo) & (z <= hi)).all()
    y = torch.stack([z[torch.randperm(16, generator=g)][:, torch.randperm(64, generator=g)] for _ in range(3)])
    y = torch.stack([row.gather(1, torch.rand(16, 64, generator=g).argsort(1)) for row in y])  # shuffle within tiles
    assert torch.equal(project_2os(y, lo, hi), y)


def test_project_2os_fixed_point_lies_in_the_bounds():
    grid = _grid((4, 64, 64), 8)
    b = _bounds(grid.m, grid.d, 1e-4, torch.device("cpu"))
    s = _smooth(3)
    y = grid.tiles((s - s.mean()) / s.std())
    one = project_2os(y, b.lo, b.hi)
    z1 = one.sort(dim=-1).values.sort(dim=-2).values
    outside = ((z1 < b.lo - 1e-9) | (z1 > b.hi + 1e-9)).double().mean()
    print(f"\n2OS single pass: {outside:.2%} of the re-sorted table outside the bounds")
    fixed = _project_2os_fixed(y, b, max_passes=50)
    z = fixed.sort(dim=-1).values.sort(dim=-2).values
    assert ((z >= b.lo - 1e-7) & (z <= b.hi + 1e-7)).all()
    assert (project_2os(fixed, b.lo, b.hi) - fixed).abs().max() < 1e-6


# ---- layouts and DCT --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 16, 64, 4096])
def test_dct_is_scipy_orthonormal_dct2_and_inverts(n):
    x = _noise((3, n), seed=n)
    assert torch.allclose(_dct(x), torch.from_numpy(scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)), atol=1e-12)
    assert torch.allclose(_dct(_dct(x), inverse=True), x, atol=1e-12)


@pytest.mark.parametrize("dims,image,m,d", [((4, 64, 64), True, 256, 64), ((1, 16, 16), True, 4, 64),
                                            ((4096,), False, 64, 64), ((1000,), False, 20, 50), ((997,), False, 997, 1),
                                            ((3, 20, 20), False, 20, 60)])
def test_grid_layouts(dims, image, m, d):
    grid = _grid(dims, 8)
    assert (grid.image, grid.m, grid.d) == (image, m, d)
    x = _noise((2, *dims))
    a = grid.tiles(x.reshape(2, *grid.shape))
    assert a.shape == (2, m, d) and torch.equal(grid.untiles(a).reshape(x.shape), x)
    if image:  # tile 1 of channel 0 is the patch in rows 0-7, columns 8-15
        assert torch.equal(a[:, 1], x[:, 0, :8, 8:16].reshape(2, 64))


# ---- W: noise, structured inputs ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 4, 64, 64), (16, 4096), (64, 1, 16, 16)])
def test_typical_noise_passes(shape):
    eps = _noise(shape, seed=7)
    w = whiten(eps)
    cos = _cos(w, eps)
    print(f"\nnoise {shape}: min cos(W(eps), eps) = {cos.min():.9f}")
    assert (cos > 0.9999).all()


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 2.0])
def test_structured_input_is_whitened_and_typical_in_norm(weight):
    g = _field(weight)
    w = whiten(g)
    n = g[0].numel()
    norm = w.flatten(1).square().mean(1)
    cin, cout = _lag1(g), _lag1(w)
    print(f"\nsmooth + {weight} noise: cos {_cos(w, g).numpy().round(3)}, |W|^2/N {norm.numpy().round(4)}, "
          f"lag-1 {cin[0].numpy().round(2)} -> {cout[0].numpy().round(3)}")
    assert (cin[0] > 0.4).all() and (cin[1] > 0.4).all()
    assert (cout[0].abs() < 0.2).all() and (cout[1].abs() < 0.2).all()
    assert ((norm - 1).abs() < 4 * math.sqrt(2 / n)).all()


def test_cos_is_positive_and_rises_with_noise():
    cos = torch.stack([_cos(whiten(g), g) for g in map(_field, [0.0, 0.1, 0.5, 2.0])])  # (weights, rows)
    print(f"\ncos(W(g), g) per weight (rows): {cos.numpy().round(3).tolist()}")
    assert (cos > 0).all()
    assert (cos.diff(dim=0) > 0).all()


KNOWN_LIMIT = pytest.mark.xfail(strict=True, reason="order-statistic sets are tile-permutation invariant: the few "
                                                    "smooth-field tiles keep top-rank bounds (module docstring)")


@pytest.mark.parametrize("kind", ["noise", 0.5, 2.0, pytest.param(0.0, marks=KNOWN_LIMIT)])
def test_output_passes_ks_against_standard_normal(kind):
    g = _noise((4, 4, 64, 64), seed=8) if kind == "noise" else _field(kind)
    p = [stats.kstest(row.numpy(), "norm").pvalue for row in whiten(g).flatten(1)]
    print(f"\nKS p-values, {kind}: {[f'{v:.2g}' for v in p]}")
    assert min(p) > 0.01 / len(p)  # each row at p > 0.01, Bonferroni over the rows (raw noise: min p = 0.005)


@pytest.mark.parametrize("kind", ["noise", pytest.param(0.0, marks=KNOWN_LIMIT), pytest.param(0.5, marks=KNOWN_LIMIT),
                                  pytest.param(2.0, marks=KNOWN_LIMIT)])
def test_band_energies_are_equal_per_coefficient(kind):
    """Per row, 2-D DCT per channel: energy per coefficient in the low band (both frequencies < 16)
    over the high band (both >= 32) is F(n_low, n_high) distributed for N(0, I) input."""
    g = _noise((4, 4, 64, 64), seed=9) if kind == "noise" else _field(kind)
    c = _dct2(whiten(g)).square()
    k1, k2 = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    low, high = (k1 < 16) & (k2 < 16), (k1 >= 32) & (k2 >= 32)
    n_low, n_high = 4 * int(low.sum()), 4 * int(high.sum())
    ratio = (c[..., low].sum((1, 2)) / n_low) / (c[..., high].sum((1, 2)) / n_high)
    lo, hi = stats.f.ppf(5e-5, n_low, n_high), stats.f.isf(5e-5, n_low, n_high)
    print(f"\nband energy ratio low/high, {kind}: {ratio.numpy().round(3)} (F range [{lo:.3f}, {hi:.3f}])")
    assert ((ratio > lo) & (ratio < hi)).all()


def test_fixed_point():
    eps = _noise((4, 4, 64, 64), seed=10)
    w = whiten(eps)
    assert _rel(whiten(w), w) < 1e-10
    res3, res10 = [], []
    for weight in (0.0, 0.5, 2.0):
        g = _field(weight)
        w3, w10 = whiten(g), whiten(g, alternations=10)
        res3.append(_rel(whiten(w3), w3))
        res10.append(_rel(whiten(w10, alternations=10), w10))
    print(f"\n|W(W(g)) - W(g)| / |W(g)|: 3 alternations {[f'{r:.1e}' for r in res3]}, 10 {[f'{r:.1e}' for r in res10]}")
    assert max(res3) < 2e-2
    assert max(res10) < 1e-3


# ---- W: contract -------------------------------------------------------------------------------


def test_rows_are_independent_and_constant_rows_map_to_zero():
    g = torch.cat([_field(0.5)[:2], torch.zeros(1, 4, 64, 64, dtype=F64), torch.full((1, 4, 64, 64), 0.3, dtype=F64),
                   _noise((1, 4, 64, 64))])
    w = whiten(g)
    assert torch.equal(w[2:4], torch.zeros_like(w[2:4]))
    for i in (0, 1, 4):
        assert torch.allclose(w[i:i + 1], whiten(g[i:i + 1]), rtol=0, atol=1e-12)


def test_scale_invariance_and_dtype():
    g = _field(0.5)[:2]
    w = whiten(g)
    for c in (1e-6, 1e6):
        assert torch.allclose(whiten(c * g), w, rtol=0, atol=1e-8)
    g32 = g.float()
    w32 = whiten(g32)
    assert w32.dtype == torch.float32 and w32.shape == g.shape
    assert torch.equal(w32, whiten(g32.double()).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    g = _field(0.5)[:2]
    assert torch.allclose(whiten(g.cuda()).cpu(), whiten(g), rtol=0, atol=1e-9)


def test_mnist_shape():
    g = _smooth(8, c=1, h=16)
    w = whiten(g)
    assert w.shape == g.shape and (_cos(w, g) > 0).all()
    assert (w.flatten(1).square().mean(1) - 1).abs().max() < 4 * math.sqrt(2 / 256)
    assert (_lag1(w)[0] < _lag1(g)[0]).all()


@pytest.mark.parametrize("kwargs,match", [(dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"),
                                          (dict(alpha=-0.5), "alpha"), (dict(tile=0), "tile"),
                                          (dict(alternations=-1), "alternations"), (dict(max_passes=0), "max_passes")])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        whiten(_noise((2, 64)), **kwargs)


@pytest.mark.parametrize("g", [torch.randn(16), torch.randn(3, 1), torch.ones(2, 8, dtype=torch.int64),
                               torch.randn(2, 0)])
def test_bad_shapes_and_dtypes_raise(g):
    with pytest.raises(ValueError, match="floating"):
        whiten(g)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_row_is_named(bad):
    g = _noise((4, 64))
    g[2, 5] = bad
    with pytest.raises(ValueError, match="row 2 "):
        whiten(g)


def test_timing():
    """Measured, not asserted tightly (one thread, shared machine)."""
    mnist = torch.cat([_smooth(500, c=1, h=16), _noise((500, 1, 16, 16))])
    for g in (mnist.float(), _noise((64, 4096)).float(), _smooth(64, c=4, h=32).reshape(64, 4096).float()):
        whiten(g[:2])
        t = time.perf_counter()
        whiten(g)
        dt = time.perf_counter() - t
        print(f"\nwhiten {tuple(g.shape)}: {dt:.3f} s")
        assert dt < 20
