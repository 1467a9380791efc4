"""CFG family on an exact class-conditional Gaussian mixture (docs/methods/cfg_family.md).

The conditional model is the component ``N(alpha mu_y, ...)`` in closed form, the unconditional
one the mixture; all expected values are closed forms from :mod:`.gmm_models`.
"""

import math

import pytest
import torch

from diffsample.guidance import APG, CFG, CFGPlusPlus, CFGZeroStar, Cond, Interval
from diffsample.samplers import Sampler
from diffsample.solvers import DPMSolverPP, Euler, Karras, TimeUniform

from .gmm_models import NS, PI, ConditionalGMM, alpha_sigma, component_denoised, labels_cond, mixture

GMM = mixture(PI)
MODEL = ConditionalGMM(GMM)


def _states(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.97 + 0.02
    a, s = alpha_sigma(t)
    x = a[:, None] * GMM.sample(n, generator=g) + s[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, t, a, s, y


def _exact(x, t, y):
    a, s = alpha_sigma(t)
    return component_denoised(GMM, x, t, y), GMM.denoised(x, a, s)


def test_cfg_scale_one_is_the_conditional_model():
    x, t, a, s, y = _states()
    d_c, _ = _exact(x, t, y)
    assert torch.allclose(CFG(1.0)(MODEL)(x, t, labels_cond(y, 3)), d_c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_cfg_is_the_linear_combination(scale):
    x, t, a, s, y = _states()
    d_c, d_u = _exact(x, t, y)
    out = CFG(scale)(MODEL)(x, t, labels_cond(y, 3))
    assert torch.allclose(out, d_u + scale * (d_c - d_u), rtol=0, atol=1e-12)


def test_rescale_phi_zero_equals_cfg_and_phi_one_matches_conditional_std():
    x, t, a, s, y = _states()
    cond = labels_cond(y, 3)
    assert torch.allclose(CFG(4.0, rescale=0.0)(MODEL)(x, t, cond), CFG(4.0)(MODEL)(x, t, cond), rtol=0, atol=1e-12)
    d_c, d_u = _exact(x, t, y)
    eps = lambda d: (x - a[:, None] * d) / s[:, None]  # noqa: E731
    out = CFG(4.0, rescale=1.0)(MODEL)(x, t, cond)
    e_c, e_cfg, e_out = eps(d_c), eps(d_u + 4.0 * (d_c - d_u)), eps(out)
    assert torch.allclose(e_out.std(1), e_c.std(1), rtol=1e-10)
    assert torch.allclose(e_out, e_cfg * e_c.std(1, keepdim=True) / e_cfg.std(1, keepdim=True), rtol=1e-10)
    half = CFG(4.0, rescale=0.3)(MODEL)(x, t, cond)
    assert torch.allclose(eps(half), 0.3 * e_out + 0.7 * e_cfg, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("space", ["x0", "eps", "flow"])
def test_apg_eta_one_no_momentum_no_threshold_equals_cfg(space):
    x, t, a, s, y = _states()
    cond = labels_cond(y, 3)
    apg = APG(scale=3.0, eta=1.0, momentum=0.0, norm_threshold=math.inf, space=space)(MODEL)
    assert torch.allclose(apg(x, t, cond), CFG(3.0)(MODEL)(x, t, cond), rtol=0, atol=1e-6)


def test_apg_eta_zero_adds_only_the_orthogonal_part():
    x, t, a, s, y = _states()
    d_c, d_u = _exact(x, t, y)
    out = APG(scale=3.0, eta=0.0, momentum=0.0, norm_threshold=math.inf)(MODEL)(x, t, labels_cond(y, 3))
    diff = out - d_c
    assert ((diff * d_c).sum(1)).abs().max() < 1e-10
    delta = d_c - d_u
    perp = delta - (delta * d_c).sum(1, keepdim=True) / (d_c * d_c).sum(1, keepdim=True) * d_c
    assert torch.allclose(diff, 2.0 * perp, rtol=0, atol=1e-12)


def test_apg_norm_threshold_caps_the_update():
    x, t, a, s, y = _states()
    d_c, d_u = _exact(x, t, y)
    r = 0.05
    out = APG(scale=3.0, eta=1.0, momentum=0.0, norm_threshold=r)(MODEL)(x, t, labels_cond(y, 3))
    delta = d_c - d_u
    capped = delta * torch.clamp(r / delta.norm(dim=1, keepdim=True), max=1.0)
    assert torch.allclose(out, d_c + 2.0 * capped, rtol=0, atol=1e-12)


def _ddim_cfgpp_reference(x, cond_y, scale, grid):
    """Hand-written CFG++ DDIM loop (arXiv 2406.08070 Alg. 1), closed-form model."""
    y = cond_y
    for i in range(grid.steps):
        t = torch.full((x.shape[0],), grid.t_list[i], dtype=torch.float64)
        a, s = grid.alpha_list[i], grid.sigma_list[i]
        a2, s2 = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        d_c, d_u = _exact(x, t, y)
        x0 = d_u + scale * (d_c - d_u)
        eps_u = (x - a * d_u) / s
        x = a2 * x0 + s2 * eps_u
    return x


def test_cfgpp_equals_hand_written_ddim_cfgpp():
    n = 64
    noise = torch.randn(n, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    sampler = Sampler(Euler(), TimeUniform(), 12)
    out = sampler(CFGPlusPlus(0.6, sampler=sampler)(MODEL), noise, labels_cond(y, 3)).x
    grid = sampler.grid(NS)
    ref = _ddim_cfgpp_reference(noise * math.hypot(grid.alpha_list[0], grid.sigma_list[0]), y, 0.6, grid)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)


def test_cfgpp_with_condition_dropped_equals_plain_ddim():
    noise = torch.randn(32, 2, dtype=torch.float64)
    null = torch.full((32,), 3)
    sampler = Sampler(Euler(), TimeUniform(), 10)
    guided = sampler(CFGPlusPlus(0.8, sampler=sampler)(MODEL), noise, Cond({"class_labels": null}, {"class_labels": null})).x
    plain = sampler(GMM.denoiser(NS), noise).x
    assert torch.allclose(guided, plain, rtol=0, atol=1e-10)


def test_cfgpp_x0_equals_cfg_x0_on_the_last_step():
    # On the step to sigma = 0 the CFG++ data prediction is the CFG one at w = lambda.
    sampler = Sampler(Euler(), TimeUniform(), 6)
    grid = sampler.grid(NS)
    x, _, _, _, y = _states(16)
    t_last = torch.full((16,), grid.t_list[-2], dtype=torch.float64)
    pp = CFGPlusPlus(0.7, grid=grid)(MODEL)(x, t_last, labels_cond(y, 3))
    assert torch.allclose(pp, CFG(0.7)(MODEL)(x, t_last, labels_cond(y, 3)), rtol=0, atol=1e-12)


def test_cfgpp_refuses_higher_order_solvers_and_missing_grid():
    with pytest.raises(ValueError, match="first-order"):
        CFGPlusPlus(0.5, sampler=Sampler(DPMSolverPP(order=2), Karras(), 5))
    x, t, a, s, y = _states(4)
    with pytest.raises(ValueError, match="grid"):
        CFGPlusPlus(0.5)(MODEL)(x, t, labels_cond(y, 3))


def test_cfg_zero_star_formula_and_zero_init():
    x, t, a, s, y = _states()
    d_c, d_u = _exact(x, t, y)
    flow = lambda d: (x - a[:, None] * d) / s[:, None] - d  # noqa: E731
    u_c, u_u = flow(d_c), flow(d_u)
    s_star = (u_c * u_u).sum(1, keepdim=True) / (u_u * u_u).sum(1, keepdim=True)
    expect = s_star * u_u + 4.0 * (u_c - s_star * u_u)
    out = CFGZeroStar(4.0)(MODEL)(x, t, labels_cond(y, 3))
    assert torch.allclose(flow(out), expect, rtol=0, atol=1e-10)
    zi = CFGZeroStar(4.0, zero_init_steps=1)(MODEL)
    for t_now, zero in [(0.9, True), (0.8, False), (0.95, True)]:  # a larger t starts a new run
        tt = torch.full_like(t, t_now)
        a, s = alpha_sigma(tt)
        out = zi(x, tt, labels_cond(y, 3))
        u = (x - a[:, None] * out) / s[:, None] - out
        assert (u.abs().max() < 1e-12) == zero


def test_interval_applies_guidance_only_inside_the_sigma_window():
    x, t, a, s, y = _states()
    cond = labels_cond(y, 3)
    sig = NS.sigma_ve(t)
    lo, hi = float(sig.quantile(0.3)), float(sig.quantile(0.7))
    out = Interval(CFG(3.0), lo, hi)(MODEL)(x, t, cond)
    d_c, d_u = _exact(x, t, y)
    inside = ((sig > lo) & (sig <= hi))[:, None]
    assert 0 < int(inside.sum()) < len(t)
    assert torch.allclose(out, torch.where(inside, d_u + 3.0 * (d_c - d_u), d_c), rtol=0, atol=1e-12)


def test_cfg_needs_a_negative_branch():
    x, t, a, s, y = _states(4)
    for term in (CFG(2.0), APG(2.0), CFGZeroStar(2.0)):
        with pytest.raises(ValueError, match="negative"):
            term(MODEL)(x, t, Cond({"class_labels": y}))


def test_apg_momentum_accumulates_and_resets_on_a_new_run():
    x, t, a, s, y = _states(8)
    cond = labels_cond(y, 3)
    apg = APG(scale=3.0, eta=1.0, momentum=-0.5, norm_threshold=math.inf)(MODEL)
    t1, t2 = torch.full_like(t, 0.8), torch.full_like(t, 0.6)
    d1c, d1u = _exact(x, t1, y)
    d2c, d2u = _exact(x, t2, y)
    first = apg(x, t1, cond)
    assert torch.allclose(first, d1c + 2.0 * (d1c - d1u), rtol=0, atol=1e-12)
    second = apg(x, t2, cond)
    delta2 = (d2c - d2u) - 0.5 * (d1c - d1u)
    assert torch.allclose(second, d2c + 2.0 * delta2, rtol=0, atol=1e-12)
    again = apg(x, t1, cond)  # t increased: a new run, no momentum carried over
    assert torch.allclose(again, first, rtol=0, atol=1e-12)


def test_interval_outside_uses_the_base_branch_of_classifier_terms():
    from diffsample.guidance import ClassifierGuidance

    from .gmm_models import noisy_classifier

    x, t, a, s, y = _states()
    cond = labels_cond(y, 3)
    out = Interval(ClassifierGuidance(noisy_classifier(GMM)), 0.0, 1e-9, base="unconditional")(MODEL)(x, t, cond)
    assert torch.allclose(out, GMM.denoised(x, a, s), rtol=0, atol=1e-12)  # never inside: unconditional model


def test_cfgpp_with_ddim_eta_equals_hand_written_stochastic_cfgpp():
    # DDIM-eta form (arXiv 2010.02502 eq. 12 with the CFG++ renoising along eps_u), same noise draws
    n, steps, eta = 32, 10, 1.0
    noise = torch.randn(n, 2, dtype=torch.float64)
    draws = torch.randn(steps, n, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    sampler = Sampler(Euler(eta=eta), TimeUniform(), steps)
    calls = iter(range(steps))
    out = sampler(CFGPlusPlus(0.5, sampler=sampler)(MODEL), noise, labels_cond(y, 3),
                  noise_fn=lambda s, sn: draws[next(calls)]).x
    grid = sampler.grid(NS)
    x = noise * math.hypot(grid.alpha_list[0], grid.sigma_list[0])
    for i in range(steps):
        t = torch.full((n,), grid.t_list[i], dtype=torch.float64)
        a, s = grid.alpha_list[i], grid.sigma_list[i]
        a2, s2 = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        d_c, d_u = _exact(x, t, y)
        x0 = d_u + 0.5 * (d_c - d_u)
        eps_u = (x - a * d_u) / s
        sig = eta * math.sqrt(s2**2 / s**2) * math.sqrt(max(0.0, 1 - (a**2 / a2**2))) if s2 > 0 else 0.0
        x = a2 * x0 + math.sqrt(max(0.0, s2**2 - sig**2)) * eps_u + sig * draws[i]
    assert torch.allclose(out, x, rtol=0, atol=1e-9)
