"""Truncated sampling and recursive retraining (arXiv 2606.13796) on the exact Gaussian mixture:
tests R-T1..R-T6 of docs/methods/truncation.md against closed forms.

* R-T1: DDPM ancestral steps with the exact denoiser, stopped at OU time t0, give ``U_t0(p)``
  (two-sample MMD, mean and covariance within 3 SE).
* R-T2: their projected Hermite moments are ``e^{-n t0/2}`` times the data's (3 SE).
* R-T3: 200 generations of the exact mixture recursion reach ``A_n`` (the literal values for
  alpha = 0.2, t0 = 0.3 below, computed independently of the code).
* R-T4: W2 to the limit contracts by at least ``kappa = 0.7698`` per generation (1-D, quantiles).
* R-T5: constant t0 plateaus at ``(1 - A_n)|a_n*|``; annealed ``t0/(1+i)^beta`` decays with
  log-slope ``-beta``.
* R-T6: unit conversions round-trip and agree with diffusers' scheduler tables.
"""

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from diffsample.samplers import Sampler
from diffsample.samplers.hermite import fit_t0, hermite_spectrum
from diffsample.solvers import SOLVERS, DiscreteVP, LinearVP, RectifiedFlow, TimeUniform, VE
from diffsample.solvers.stop_time import STOP_UNITS, StopTime, sigma_ve_to
from diffsample.solvers.truncation import TruncationSchedule, attenuation, contraction_rate, predicted_attenuation
from diffsample.testbed.gmm import GaussianMixture
from diffsample.testbed.truncation import ou_push, projected_hermite_moments, recursion

# Asymmetric 2-D mixture (odd moments do not vanish), in VP coordinates.
GMM = GaussianMixture(torch.tensor([[-1.2, 0.3], [0.9, 0.8], [0.4, -1.1]]), torch.tensor([0.35, 0.5, 0.3]),
                      torch.tensor([0.5, 0.3, 0.2]))
N = 3000
A_N_LITERAL = [1, .55274, .36373, .26031, .19567, .15186, .12051, .09720, .07936]  # alpha = 0.2, t0 = 0.3


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread avoids contention


@pytest.fixture(scope="module")
def truncated_samples():
    """Exact-denoiser DDPM ancestral runs of 1000 steps stopped at t0 (OU time), returning x_t0."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ns = LinearVP()
    out = {}
    for t0 in (0.05, 0.3):
        sampler = Sampler(SOLVERS.create("euler_ancestral"), TimeUniform(), 1000, stop=StopTime(t0, "ou_time"))
        g = torch.Generator().manual_seed(int(100 * t0))
        noise = torch.randn(N, 2, generator=g, dtype=torch.float64)
        result = sampler(GMM.denoiser(ns), noise,
                         noise_fn=lambda s, s_next: torch.randn(N, 2, generator=g, dtype=torch.float64))
        assert result.grid.sigma_list[-1] / result.grid.alpha_list[-1] == pytest.approx(math.sqrt(math.expm1(t0)))
        out[t0] = result.x
    torch.set_num_threads(threads)
    return out


def _mixture_mean_cov(gmm: GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
    w, mu, s2 = gmm.weights.numpy(), gmm.means.numpy(), gmm.stds.numpy() ** 2
    mean = w @ mu
    second = np.einsum("k,ki,kj->ij", w, mu, mu) + (w @ s2) * np.eye(mu.shape[1])
    return mean, second - np.outer(mean, mean)


def _mmd_pvalue(x: np.ndarray, y: np.ndarray, permutations: int = 300, seed: int = 0) -> float:
    """Permutation p-value of the biased MMD^2 with a Gaussian kernel (median bandwidth)."""
    z = np.concatenate([x, y])
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / np.median(d2))
    n = len(x)
    rng = np.random.default_rng(seed)
    labels = np.stack([np.r_[np.ones(n), -np.ones(len(y))]] +
                      [rng.permutation(np.r_[np.ones(n), -np.ones(len(y))]) for _ in range(permutations)], axis=1)
    stats = np.einsum("ip,ip->p", labels, k @ labels)
    return float((stats[1:] >= stats[0]).mean())


@pytest.mark.parametrize("t0", [0.05, 0.3])
def test_rt1_truncated_output_is_the_ou_push_of_the_data(truncated_samples, t0):
    x = truncated_samples[t0].numpy()
    target = ou_push(GMM, t0)
    exact = target.sample(1000, torch.Generator().manual_seed(7)).numpy()
    assert _mmd_pvalue(x[:1000], exact) > 0.01
    mean, cov = _mixture_mean_cov(target)
    assert np.all(np.abs(x.mean(0) - mean) < 3 * x.std(0) / math.sqrt(N))
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    assert np.all(np.abs(prods.mean(0) - cov) < 3 * prods.std(0) / math.sqrt(N))
    if t0 == 0.3:  # the test can fail: the untruncated data law is rejected
        data = GMM.sample(1000, torch.Generator().manual_seed(8)).numpy()
        assert _mmd_pvalue(x[:1000], data) < 0.01


@pytest.mark.parametrize("t0", [0.05, 0.3])
def test_rt2_hermite_moments_attenuate_by_exp_minus_n_t0_over_2(truncated_samples, t0):
    spec = hermite_spectrum(truncated_samples[t0], n_max=6, n_dirs=16, seed=1)
    data = projected_hermite_moments(GMM, spec.directions, n_max=6)
    n = np.arange(7)[:, None]
    z = (spec.moments - np.exp(-n * t0 / 2) * data)[1:] / spec.se[1:]
    assert np.abs(z).max() < 4.0 and np.mean(np.abs(z) < 3) > 0.95
    # Ratios to a large exact data sample, pooled per degree, within 3 SE of e^{-n t0/2}.
    ref = GMM.sample(100_000, torch.Generator().manual_seed(9))
    spec = hermite_spectrum(truncated_samples[t0], ref=ref, n_max=6, n_dirs=16, seed=1)
    k = np.arange(1, 7)
    assert np.all(np.abs(spec.ratio_n[1:] - np.exp(-k * t0 / 2)) < 3 * spec.ratio_n_se[1:])
    fit = fit_t0(spec)
    assert abs(fit.t0 - t0) < 3 * fit.t0_se + 0.01
    if t0 == 0.3:  # no truncation would give ratios of 1: far outside the error bars
        assert np.all(np.abs(spec.ratio_n[2:] - 1) > 4 * spec.ratio_n_se[2:])


def test_rt2_gauss_hermite_check_of_the_ou_eigen_relation():
    sym = GaussianMixture(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.4, 0.4]), torch.tensor([0.5, 0.5]))
    dirs = np.ones((1, 1))
    before = projected_hermite_moments(sym, dirs)[:, 0]
    after = projected_hermite_moments(ou_push(sym, 0.3), dirs)[:, 0]
    ratios = after[2::2] / before[2::2]
    assert ratios == pytest.approx([0.74082, 0.54881, 0.40657, 0.30119], abs=1e-5)


def test_rt3_closed_form_recursion_reaches_a_n():
    assert attenuation(np.arange(9), 0.3, 0.2) == pytest.approx(A_N_LITERAL, abs=6e-6)
    limit = recursion(GMM, 0.2, 0.3, 200)[-1]
    dirs = np.array([[1.0, 0.0], [0.6, 0.8], [-0.8, 0.6]])
    ratio = projected_hermite_moments(limit, dirs) / projected_hermite_moments(GMM, dirs)
    for d in range(3):  # odd degrees included: the mixture is asymmetric
        assert ratio[:, d] == pytest.approx(A_N_LITERAL, abs=2e-5)
    assert predicted_attenuation(199, np.arange(9), 0.2, TruncationSchedule("constant", t0=0.3)) == \
        pytest.approx(A_N_LITERAL, abs=6e-6)


def _quantiles(gmm: GaussianMixture, u: np.ndarray, grid: np.ndarray) -> np.ndarray:
    mu, s, w = gmm.means.numpy()[:, 0], gmm.stds.numpy(), gmm.weights.numpy()
    cdf = np.zeros_like(grid)
    for lo in range(0, len(w), 50):
        sl = slice(lo, lo + 50)
        cdf += w[sl] @ ndtr((grid[None, :] - mu[sl, None]) / s[sl, None])
    return np.interp(u, cdf, grid)


def test_rt4_w2_to_the_limit_contracts_by_kappa():
    kappa = contraction_rate(0.3, 0.2)
    assert kappa == pytest.approx(0.7698, abs=5e-5)
    p_data = GaussianMixture(torch.tensor([[-1.5], [0.5], [2.0]]), torch.tensor([0.3, 0.6, 0.2]),
                             torch.tensor([0.3, 0.5, 0.2]))
    laws = [p_data] + recursion(p_data, 0.2, 0.3, 80)
    grid = np.linspace(-8, 8, 100_001)
    m = 50_000
    u = (np.arange(m) + 0.5) / m
    q_inf = _quantiles(laws[-1], u, grid)
    w2 = [math.sqrt(np.mean((_quantiles(p, u, grid) - q_inf) ** 2)) for p in laws[:11]]
    assert w2[0] > 0.3  # far from the limit at the start
    for i in range(10):
        assert w2[i + 1] <= kappa * w2[i] * (1 + 1e-4), (i, w2[i + 1] / w2[i])


def test_rt5_constant_truncation_plateaus_and_annealing_removes_the_bias():
    alpha, t0 = 0.2, 0.3
    dirs = np.array([[0.6, 0.8]])
    a_star = projected_hermite_moments(GMM, dirs)[:, 0]
    k = np.arange(9)
    constant = TruncationSchedule("power", t0=t0, beta=0.0)
    laws = recursion(GMM, alpha, constant.t0_at, 60)
    plateau = np.abs(projected_hermite_moments(laws[-1], dirs)[:, 0] - a_star)
    assert plateau[1:] == pytest.approx((1 - attenuation(k, t0, alpha))[1:] * np.abs(a_star[1:]), rel=1e-4)
    for beta in (0.5, 1.0, 2.0):
        sched = TruncationSchedule("power", t0=t0, beta=beta)
        laws = recursion(GMM, alpha, sched.t0_at, 41)
        # The scalar Hermite recursion agrees with the exact mixture recursion (quadrature).
        for i in (0, 10, 40):
            exact = projected_hermite_moments(laws[i], dirs)[:, 0] / a_star
            assert exact == pytest.approx(sched.predicted_attenuation(i, k, alpha), abs=1e-9)
        err40 = np.abs(1 - sched.predicted_attenuation(40, k, alpha))[1:]
        assert np.all(err40 < (1 - attenuation(k, t0, alpha))[1:])
        # Error -> 0 with log-slope -beta against log(1 + i).
        e1 = 1 - sched.predicted_attenuation(2000, 4, alpha)
        e2 = 1 - sched.predicted_attenuation(4000, 4, alpha)
        slope = math.log(e2 / e1) / math.log(4001 / 2001)
        assert slope == pytest.approx(-beta, abs=0.03)


SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.mark.parametrize("ns", [LinearVP(), DiscreteVP.from_config(SD_CONFIG), VE(), RectifiedFlow()],
                         ids=["linear_vp", "discrete_vp", "ve", "rectified_flow"])
def test_rt6_unit_conversions_round_trip(ns):
    for t0 in (0.01, 0.3, 2.0):
        stop = StopTime(t0, "ou_time")
        value, unit = t0, "ou_time"
        for nxt in ("logsnr", "lambda", "sigma", "t_rf", "native", "ou_time"):
            value = StopTime(value, unit).to(nxt, ns)
            unit = nxt
        assert value == pytest.approx(t0, rel=1e-6)
        s = stop.sigma_ve(ns)
        for u in STOP_UNITS:
            assert StopTime(stop.to(u, ns), u).sigma_ve(ns) == pytest.approx(s, rel=1e-6)


def test_rt6_conversions_match_the_closed_forms_and_diffusers_tables():
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(**SD_CONFIG).alphas_cumprod.double()
    dvp = DiscreteVP.from_config(SD_CONFIG)
    for t in (0, 37, 500, 999):
        stop = StopTime(t, "native")
        a2 = float(ac[t])
        assert stop.sigma_ve(dvp) == pytest.approx(math.sqrt((1 - a2) / a2), rel=1e-6)
        assert stop.to("ou_time", dvp) == pytest.approx(-math.log(a2), rel=1e-6)  # alpha^2 = e^{-tau}
        assert stop.to("logsnr", dvp) == pytest.approx(math.log(a2 / (1 - a2)), rel=1e-6)
    assert StopTime(0.25, "native").to("t_rf", RectifiedFlow()) == pytest.approx(0.25)
    assert StopTime(1.7, "native").to("sigma", VE()) == pytest.approx(1.7)
    assert StopTime(0.5, "t_rf").sigma_ve() == pytest.approx(1.0)
    assert StopTime(1.0, "sigma_edm").to("ou_time") == pytest.approx(math.log(2.0))
    assert sigma_ve_to(0.0, "lambda") == math.inf
