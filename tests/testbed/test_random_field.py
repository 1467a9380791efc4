"""The random-field testbed (testbed/random_field.py) against dense closed forms: on a small torus
every circulant covariance is built as an explicit matrix, and the mixture's density, posterior,
denoiser, tilted targets and feature moments are recomputed with dense linear algebra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffsample.samplers.sampler import Sampler
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, LinearVP
from diffsample.testbed.random_field import (RandomFieldMixture, frechet_distance, power_law_spectrum, reflect)

SHAPE = (2, 4, 4)
N = math.prod(SHAPE)


@pytest.fixture(scope="module")
def field():
    return RandomFieldMixture.example(SHAPE, components=3, seed=3, template_scale=1.5)


def dense_cov(field, k):
    eye = torch.eye(N, dtype=torch.float64).reshape(N, *SHAPE)
    return field.cov_apply(eye, k).reshape(N, N)


def dense_logpdf(field, x, alpha, sigma):
    """(B, K) log pi_k N(x; alpha m_k, alpha^2 C_k + sigma^2 I) by scipy."""
    cols = []
    for k in range(len(field.weights)):
        cov = alpha**2 * dense_cov(field, k) + sigma**2 * torch.eye(N, dtype=torch.float64)
        mvn = stats.multivariate_normal(alpha * field.means[k].flatten().numpy(), cov.numpy())
        cols.append(np.log(float(field.weights[k])) + mvn.logpdf(x.reshape(len(x), N).numpy()))
    return torch.from_numpy(np.stack(cols, 1))


def test_dense_covariance_is_symmetric_positive_and_power_law_has_the_pixel_variance():
    s = power_law_spectrum(SHAPE, exponent=2.5, cutoff=0.7, variance=2.0)
    assert torch.allclose(s, reflect(s))
    f = RandomFieldMixture(torch.zeros(1, *SHAPE), s[None], torch.ones(1))
    c = dense_cov(f, 0)
    assert torch.allclose(c, c.T, atol=1e-12)
    assert torch.allclose(torch.diagonal(c), torch.full((N,), 2.0, dtype=torch.float64), atol=1e-12)
    assert float(torch.linalg.eigvalsh(c).min()) > 0
    # stationary: covariance depends only on the (periodic) offset
    img = c[0].reshape(SHAPE)  # covariance of pixel (0, 0, 0) with all pixels
    shifted = c[1 * 4 + 1].reshape(SHAPE)  # pixel (0, 1, 1)
    assert torch.allclose(torch.roll(img, (1, 1), (1, 2)), shifted, atol=1e-12)


@pytest.mark.parametrize("alpha, sigma", [(1.0, 0.0), (0.9, 0.3), (0.3, 1.2)])
def test_log_prob_and_posterior_match_dense_gaussians(field, alpha, sigma):
    g = torch.Generator().manual_seed(0)
    x = alpha * field.sample(6, g) + sigma * torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    dense = dense_logpdf(field, x, alpha, sigma)
    assert torch.allclose(field.log_prob(x, alpha, sigma), torch.logsumexp(dense, 1), atol=1e-9)
    assert torch.allclose(field.component_posterior(x, alpha, sigma), torch.softmax(dense, 1), atol=1e-10)


@pytest.mark.parametrize("alpha, sigma", [(0.95, 0.2), (0.5, 0.9), (0.05, 1.0)])
def test_denoiser_is_the_dense_posterior_mean_and_score_the_gradient(field, alpha, sigma):
    g = torch.Generator().manual_seed(1)
    x = alpha * field.sample(5, g) + sigma * torch.randn(5, *SHAPE, generator=g, dtype=torch.float64)
    w = torch.softmax(dense_logpdf(field, x, alpha, sigma), 1)
    xf = x.reshape(5, N)
    want = torch.zeros(5, N, dtype=torch.float64)
    for k in range(len(field.weights)):
        ck = dense_cov(field, k)
        m = field.means[k].flatten()
        gain = alpha * ck @ torch.linalg.inv(alpha**2 * ck + sigma**2 * torch.eye(N, dtype=torch.float64))
        want += w[:, k:k + 1] * (m + (xf - alpha * m) @ gain.T)
    assert torch.allclose(field.denoised(x, alpha, sigma).reshape(5, N), want, atol=1e-9)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(field.log_prob(xg, alpha, sigma).sum(), xg)
    assert torch.allclose(field.score(x, alpha, sigma), grad, atol=1e-8)


def test_chunked_batches_agree_with_one_block(field):
    small = RandomFieldMixture(field.means, field.spectra, field.weights, chunk=3)
    x = field.sample(10, torch.Generator().manual_seed(2))
    assert torch.allclose(small.denoised(x, 0.7, 0.6), field.denoised(x, 0.7, 0.6), atol=1e-13)
    assert torch.allclose(small.log_prob(x, 0.7, 0.6), field.log_prob(x, 0.7, 0.6), atol=1e-10)


def test_samples_have_the_exact_moments(field):
    x = field.sample(20000, torch.Generator().manual_seed(4)).reshape(20000, N)
    mean, cov = field.linear_moments(torch.eye(N, dtype=torch.float64).reshape(N, *SHAPE))
    se = (torch.diagonal(cov) / 20000).sqrt()
    assert float(((x.mean(0) - mean).abs() / se).max()) < 4.5
    assert float((torch.cov(x.T) - cov).abs().max()) < 0.08 * float(torch.diagonal(cov).max())


def test_linear_moments_match_dense_mixture_moments(field):
    p = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean, cov = field.linear_moments(p)
    pf = p.reshape(5, N)
    mu = sum(float(w) * field.means[k].flatten() for k, w in enumerate(field.weights))
    second = sum(float(w) * (dense_cov(field, k) + torch.outer(field.means[k].flatten(), field.means[k].flatten()))
                 for k, w in enumerate(field.weights))
    assert torch.allclose(mean, pf @ mu, atol=1e-10)
    assert torch.allclose(cov, pf @ (second - torch.outer(mu, mu)) @ pf.T, atol=1e-9)


def _log_density_ratio_is_the_reward(field, tilted, reward, beta):
    """log p'(x) - log p0(x) - r(x) / beta is the same constant for every x (exact tilt)."""
    x = field.sample(8, torch.Generator().manual_seed(6)) * 1.3
    gap = tilted.log_prob(x) - field.log_prob(x) - reward(x) / beta
    assert float(gap.max() - gap.min()) < 1e-8, gap


def test_tilted_linear_is_the_exact_tilt(field):
    a = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    beta = 2.0
    tilted = field.tilted_linear(a, beta)
    _log_density_ratio_is_the_reward(field, tilted, lambda x: (x * a).sum((1, 2, 3)), beta)
    # mean reward of the tilt = d/d(1/beta) log Z: finite difference of log E[exp(r / beta)]
    # against the closed-form mean of the tilted mixture
    ck = [float((field.cov_apply(a, k) * a).sum()) for k in range(3)]
    mk = [float((field.means[k] * a).sum()) for k in range(3)]

    def log_z(u):
        return math.log(sum(float(w) * math.exp(u * m + u * u * c / 2) for w, m, c in zip(field.weights, mk, ck)))

    h = 1e-5
    assert tilted.linear_reward_mean(a) == pytest.approx((log_z(1 / beta + h) - log_z(1 / beta - h)) / (2 * h), rel=1e-6)


@pytest.mark.parametrize("q", [0.7, "spectrum"])
def test_tilted_quadratic_is_the_exact_tilt(field, q):
    c = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    qs = power_law_spectrum(SHAPE, exponent=-1.0, cutoff=1.0) if q == "spectrum" else q
    beta = 1.5
    tilted = field.tilted_quadratic(qs, c, beta)
    q_full = torch.as_tensor(qs, dtype=torch.float64).expand(SHAPE)

    def reward(x):
        d = x - c
        return -0.5 * (torch.fft.fft2(d, norm="ortho").abs().square() * q_full).sum((1, 2, 3))

    _log_density_ratio_is_the_reward(field, tilted, reward, beta)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    f64 = torch.float64
    m1, m2 = torch.tensor([0.0, 1.0, 2.0], dtype=f64), torch.tensor([0.5, 1.0, -1.0], dtype=f64)
    a, b = torch.tensor([1.0, 4.0, 0.25], dtype=f64), torch.tensor([2.0, 1.0, 0.25], dtype=f64)
    want = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, rel=1e-9)
    r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    got = frechet_distance(m1 @ r.T, r @ torch.diag(a) @ r.T, m2 @ r.T, r @ torch.diag(b) @ r.T)
    assert got == pytest.approx(want, rel=1e-7)


def test_exact_denoiser_in_the_sampler_reproduces_the_data_and_the_tilted_target():
    """DDPM (euler_ancestral, 100 steps) with the exact denoiser of p0 and of its linear tilt: the
    mean template reward matches the closed form within 4 standard errors."""
    shape = (2, 8, 8)
    field = RandomFieldMixture.example(shape, components=2, seed=1, template_scale=1.0)
    a = field.means[0] / field.means[0].norm()
    tilted = field.tilted_linear(a, 0.5)
    smp = Sampler(SOLVERS.create("euler_ancestral"), STEP_SCHEDULES.create("linspace"), 100)
    for target in (field, tilted):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(1500, *shape, generator=g, dtype=torch.float64)
        x = smp(target.denoiser(LinearVP()), noise,
                noise_fn=lambda s, sn: torch.randn(1500, *shape, generator=g, dtype=torch.float64)).x
        r = (x * a).sum((1, 2, 3))
        assert abs(float(r.mean()) - target.linear_reward_mean(a)) < 4 * float(r.std()) / math.sqrt(1500)


def test_bad_input_is_refused(field):
    s = power_law_spectrum(SHAPE)
    asym = s.clone()
    asym[0, 0, 1] *= 2
    with pytest.raises(ValueError, match="symmetric"):
        RandomFieldMixture(torch.zeros(1, *SHAPE), asym[None], torch.ones(1))
    with pytest.raises(ValueError, match="positive"):
        RandomFieldMixture(torch.zeros(1, *SHAPE), -s[None], torch.ones(1))
    with pytest.raises(ValueError, match=r"\(K, C, H, W\)"):
        RandomFieldMixture(torch.zeros(1, 16), s.flatten()[None], torch.ones(1))
    with pytest.raises(ValueError, match="samples must be"):
        field.denoised(torch.zeros(2, 3, 4, 4), 1.0, 0.5)
    with pytest.raises(ValueError, match="beta"):
        field.tilted_linear(torch.ones(SHAPE), 0.0)
    with pytest.raises(ValueError, match="cutoff"):
        power_law_spectrum(SHAPE, cutoff=0.0)
