"""NoiseTilt's strength schedules (constant, per-step, search-matched) and whitening variants
(2OS, flattened rFFT, plain normalisation, identity) against exact expressions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffsample.guidance import GUIDANCE, NoiseTilt, Resources
from diffsample.guidance.noisetilt import expected_max_normal, whitened
from diffsample.guidance.whitening import rfft_real, whiten
from diffsample.samplers.sampler import Sampler
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, LinearVP
from diffsample.testbed.random_field import RandomFieldMixture

from .reward_gmm import NS, Setup

torch.set_num_threads(1)


def run(guided, n, dim, steps=12, seed=0):
    smp = Sampler(SOLVERS.create("euler_ancestral"), STEP_SCHEDULES.create("linspace"), steps)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
    gz = torch.Generator().manual_seed(seed + 1)
    return smp(guided, noise, noise_fn=lambda s, sn: torch.randn(n, dim, generator=gz, dtype=torch.float64))


def test_expected_max_normal_closed_forms():
    assert expected_max_normal(1) == pytest.approx(0.0, abs=1e-10)
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-9)
    assert expected_max_normal(3) == pytest.approx(1.5 / math.sqrt(math.pi), rel=1e-9)
    z = torch.randn(200_000, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64).amax(1)
    assert abs(expected_max_normal(20) - float(z.mean())) < 4 * float(z.std()) / math.sqrt(len(z))


def test_schedule_is_the_interpolated_per_step_rho_and_one_value_is_constant():
    s = Setup(64)
    den = s.gmm.denoiser(NS)
    guided = NoiseTilt(s.reward, rho="schedule", schedule=(0.0, 0.2, 0.1), strength=0.5)(den)
    run(guided, 8, 64)
    steps = 12
    for rec in guided.trace:
        want = 0.5 * float(np.interp(rec.i / steps, [0.0, 0.5, 1.0], [0.0, 0.2, 0.1]))
        assert torch.allclose(rec.rho, torch.full_like(rec.rho, want), atol=1e-15)
    one = run(NoiseTilt(s.reward, rho="schedule", schedule=(0.03,))(den), 8, 64).x
    const = run(NoiseTilt(s.reward, rho="constant", strength=0.03)(den), 8, 64).x
    assert torch.equal(one, const)


def test_search_matched_rho_with_normalised_gradient_is_m_k_squared_over_n():
    """w = sqrt(N) g / |g| has cos(w, g) = 1 and |w|^2 = N, so rho = m_K^2 / N exactly."""
    s = Setup(256)
    guided = NoiseTilt(s.reward, rho="search_matched", width=20, whitening="normalize")(s.gmm.denoiser(NS))
    run(guided, 8, 256)
    want = expected_max_normal(20) ** 2 / 256
    assert guided.trace and all(torch.allclose(r.rho, torch.full_like(r.rho, want), rtol=1e-10) for r in guided.trace)


def test_beta_matched_with_normalised_gradient_shifts_the_mean_by_the_dps_amount():
    """The tilted noise with a zero fresh draw is sqrt(rho) w = std g / beta along g exactly:
    x_next - mean = std^2 g / beta (the linearised optimal kernel's shift)."""
    s = Setup(128)
    den = s.gmm.denoiser(NS)
    beta = 0.7
    guided = NoiseTilt(s.reward, beta=beta, whitening="normalize")(den)
    smp = Sampler(SOLVERS.create("euler_ancestral"), STEP_SCHEDULES.create("linspace"), 10)
    grid = smp.grid(NS)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.full((4,), grid.t_list[5], dtype=torch.float64)
    guided(x, t)
    g = guided.pending[0].clone()
    mean, std = torch.zeros_like(x), 0.05
    out = guided.transition(mean, std, grid, 5, lambda: torch.zeros_like(x))
    assert torch.allclose(out, std**2 * g / beta, rtol=1e-10, atol=1e-14)


def test_whitening_variants():
    g = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    term = NoiseTilt(lambda x: x.sum(1))
    assert torch.equal(whitened(g, NoiseTilt(term.reward, whitening="identity")), g)
    w = whitened(g * 7.0, NoiseTilt(term.reward, whitening="normalize"))
    assert torch.allclose(w.flatten(1).norm(dim=1), torch.full((3,), 32.0, dtype=torch.float64))
    assert torch.allclose(w, g * 32.0 / g.flatten(1).norm(dim=1).reshape(3, 1, 1, 1))
    # typical noise passes the rFFT-domain W almost unchanged; a smooth field is scrambled
    n = g.flatten(1)
    wr = whitened(g, NoiseTilt(term.reward, whitening="rfft")).flatten(1)
    assert float(((wr * n).sum(1) / (wr.norm(dim=1) * n.norm(dim=1))).min()) > 0.999
    smooth = g.cumsum(-1).cumsum(-2)
    ws = whitened(smooth, NoiseTilt(term.reward, whitening="rfft")).flatten(1)
    cos = (ws * smooth.flatten(1)).sum(1) / (ws.norm(dim=1) * smooth.flatten(1).norm(dim=1))
    assert float(cos.max()) < 0.8 and float(cos.min()) > 0


@pytest.mark.parametrize("n", [16, 17, 2])
def test_rfft_real_is_orthogonal_and_inverts(n):
    eye = torch.eye(n, dtype=torch.float64)
    m = rfft_real(eye)  # row i: the transform of e_i
    assert torch.allclose(m @ m.T, eye, atol=1e-12)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert torch.allclose(rfft_real(rfft_real(x), inverse=True), x, atol=1e-12)
    f = np.fft.rfft(x.numpy(), norm="ortho")
    assert np.allclose(rfft_real(x)[:, 0].numpy(), f[:, 0].real)
    if n > 2:
        assert np.allclose(rfft_real(x)[:, 1:3].numpy(), math.sqrt(2) * np.stack([f[:, 1].real, f[:, 1].imag], 1))


def test_random_field_gradients_exercise_w_unlike_the_isotropic_mixture():
    """On the field testbed the template-reward gradient through the exact denoiser is a smooth
    image and W moves it far (cos well below 1); on the isotropic 1024-D mixture it is ~ noise-like."""
    field = RandomFieldMixture.example((4, 32, 32), components=2, seed=0, exponents=(3.0,))
    a = torch.zeros(4, 32, 32, dtype=torch.float64)
    a[0, 8:24, 8:24] = 1.0
    x = field.sample(4, torch.Generator().manual_seed(0)) * 0.6 + 0.8 * torch.randn(4, 4, 32, 32, dtype=torch.float64)
    xg = x.requires_grad_(True)
    (g,) = torch.autograd.grad((field.denoised(xg, 0.6, 0.8) * a).sum(), xg)
    w = whiten(g)
    cos = (w * g).flatten(1).sum(1) / (w.flatten(1).norm(dim=1) * g.flatten(1).norm(dim=1))
    assert float(cos.max()) < 0.5, cos


def test_registry_accepts_the_new_options_and_refuses_bad_ones():
    res = Resources()
    term = GUIDANCE.create("noisetilt:reward=ink,rho=schedule,schedule=[0.0,0.1],whitening=rfft", resources=res)
    assert term.schedule == (0.0, 0.1) and term.whitening == "rfft"
    term = GUIDANCE.create("noisetilt:reward=ink,rho=search_matched,width=50", resources=res)
    assert term.width == 50
    with pytest.raises(ValueError, match="unknown whitening 'dct'; valid: 2os, rfft, normalize, identity"):
        GUIDANCE.create("noisetilt:reward=ink,whitening=dct", resources=res)
    with pytest.raises(ValueError, match="rho=schedule needs schedule"):
        GUIDANCE.create("noisetilt:reward=ink,rho=schedule", resources=res)
    with pytest.raises(ValueError, match=r"every value in \[0, 1\]"):
        NoiseTilt(lambda x: x.sum(1), rho="schedule", schedule=(0.5, 1.5))
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        NoiseTilt(lambda x: x.sum(1), rho="search_matched", width=0)
    with pytest.raises(ValueError, match="unknown domain"):
        whiten(torch.randn(2, 16), domain="wavelet")


def test_template_score_value_gradient_and_errors():
    from diffsample.guidance.rewards import RewardError, TemplateScore

    t = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = TemplateScore(t, scale=2.0)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    value = r(x)
    assert torch.allclose(value, 2.0 * (x * t).sum((1, 2, 3)))
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.allclose(grad, 2.0 * t.expand(3, 1, 4, 4))
    with pytest.raises(RewardError, match="template of shape"):
        r(torch.zeros(2, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point tensor"):
        TemplateScore([1.0, 2.0])
