"""Jeffrey guidance on exact Gaussian mixtures (docs/methods/jeffrey.md).

Class = mixture component, so the noisy classifier ``p_t(y | x_t)`` is the exact responsibility
and the Jeffrey target is the reweighted mixture ``sum_k pi*_k N(mu_k, s_k^2 I)`` in closed form.
"""

import math

import pytest
import torch

from diffsample.guidance import ClassifierGuidance, JeffreyGuidance, estimate_marginal
from diffsample.guidance.jeffrey.class_marginal import log_weights, total_variation
from diffsample.samplers import Sampler
from diffsample.solvers import Euler, TimeUniform

from .gmm_models import (NS, PI, PI_STAR, ConditionalGMM, alpha_sigma, assign, mixture, mutual_information,
                         noisy_classifier, proportions, within_two_sigma)

GMM = mixture(PI)
TARGET = mixture(PI_STAR)


def _states(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64) * (NS.t_max - 0.01) + 0.01
    a, s = alpha_sigma(t)
    x0 = GMM.sample(n, generator=g)
    x = a[:, None] * x0 + s[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, t, a, s


def _jeffrey(target=PI_STAR, marginal=PI, **kw):
    return JeffreyGuidance(target, marginal, classifier=noisy_classifier(GMM), **kw)


def _sample(denoiser, n, steps=200, seed=0, eta=1.0):
    torch.manual_seed(seed)
    noise = torch.randn(n, 2, dtype=torch.float64)
    return Sampler(Euler(eta=eta), TimeUniform(), steps)(denoiser, noise).x


def test_identity_correction_equals_score_difference():
    x, t, a, s = _states()
    guided = _jeffrey()(GMM.denoiser(NS))
    corr = guided.correction(x, t)
    exact = TARGET.score(x, a, s) - GMM.score(x, a, s)
    assert torch.allclose(corr, exact, rtol=0, atol=1e-8 * (1 + exact.abs().max()))
    # as a denoiser: the guided data prediction is the target mixture's exact denoiser
    assert torch.allclose(guided(x, t), TARGET.denoised(x, a, s), rtol=0, atol=1e-9)


def test_uniform_weights_give_no_correction():
    x, t, a, s = _states()
    guided = _jeffrey(target=PI, marginal=PI)(GMM.denoiser(NS))
    assert guided.correction(x, t).abs().max() < 1e-10


def test_conditional_variant_identity():
    x, t, a, s = _states()
    term = JeffreyGuidance(PI_STAR, PI, classifier=noisy_classifier(GMM), variant="conditional")
    out = term(ConditionalGMM(GMM))(x, t, None)
    assert torch.allclose(out, TARGET.denoised(x, a, s), rtol=0, atol=1e-9)


def test_exact_estimator_sampling_hits_target_and_keeps_components():
    n = 2000
    x = _sample(_jeffrey()(GMM.denoiser(NS)), n, steps=200)
    lab = assign(TARGET, x)
    p = proportions(lab, 3)
    assert within_two_sigma(p, PI_STAR, n), p
    for k in range(3):  # rigidity: p(x | y) is kept
        xs = x[lab == k]
        assert (xs.mean(0) - GMM.means[k]).abs().max() < 4 * GMM.stds[k] / math.sqrt(len(xs)) + 0.02
        assert abs(xs.std(0).mean() / GMM.stds[k] - 1) < 0.08


def test_point_mass_equals_classifier_guidance():
    x, t, a, s = _states()
    e2 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    jeff = _jeffrey(target=e2)(GMM.denoiser(NS))
    cg = ClassifierGuidance(noisy_classifier(GMM), label=2)(GMM.denoiser(NS))
    assert torch.allclose(jeff(x, t), cg(x, t), rtol=0, atol=1e-10)
    # and both equal the exact denoiser of component 2 alone
    comp2 = mixture(torch.tensor([1e-300, 1e-300, 1.0], dtype=torch.float64))
    assert torch.allclose(cg(x, t), comp2.denoised(x, a, s), rtol=0, atol=1e-8)
    xs = _sample(jeff, 2000, steps=200)
    assert bool((assign(GMM, xs) == 2).all())
    assert (xs.mean(0) - GMM.means[2]).abs().max() < 0.05
    assert abs(xs.std(0).mean() / GMM.stds[2] - 1) < 0.08


def test_estimated_marginal_gives_exact_reweighted_mixture():
    # with p_hat in place of pi, the guided model is exactly the mixture with weights ∝ pi p*/p_hat
    p_hat = torch.tensor([0.45, 0.33, 0.22], dtype=torch.float64)
    x, t, a, s = _states()
    guided = _jeffrey(marginal=p_hat)(GMM.denoiser(NS))
    achieved = mixture(PI * PI_STAR / p_hat)
    assert torch.allclose(guided(x, t), achieved.denoised(x, a, s), rtol=0, atol=1e-9)


def test_estimated_marginal_error_shrinks_like_inverse_sqrt_n():
    g = torch.Generator().manual_seed(1)
    classify = lambda x0: torch.log(GMM.component_posterior(x0))  # noqa: E731
    sizes, errors = [100, 400, 1600], []
    for n in sizes:
        tv = []
        for _ in range(60):
            est = estimate_marginal(GMM.sample(n, generator=g), classify, kind="hard")
            achieved = PI * PI_STAR / est.probs
            tv.append(total_variation(achieved / achieved.sum(), PI_STAR))
        errors.append(sum(tv) / len(tv))
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(sizes[-1]) - math.log(sizes[0]))
    assert -0.62 < slope < -0.38, (errors, slope)


def test_recalibration_round_reduces_tv():
    # a coarse sampler (8 DDIM steps) has discretization bias; estimate p_theta from it, guide, then
    # re-estimate on the guided samples and recalibrate once.
    n, steps = 10000, 8
    classify = lambda x0: torch.log(TARGET.component_posterior(x0))  # noqa: E731
    unguided = _sample(GMM.denoiser(NS), n, steps=steps, eta=0.0, seed=1)
    term = _jeffrey(marginal=estimate_marginal(unguided, classify, kind="hard").probs)
    x1 = _sample(term(GMM.denoiser(NS)), n, steps=steps, eta=0.0, seed=2)
    p1 = estimate_marginal(x1, classify, kind="hard").probs
    x2 = _sample(term.recalibrated(p1)(GMM.denoiser(NS)), n, steps=steps, eta=0.0, seed=3)
    p2 = estimate_marginal(x2, classify, kind="hard").probs
    assert total_variation(p2, PI_STAR) < total_variation(p1, PI_STAR)


def test_fairness_toy_makes_attributes_independent():
    means = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]], dtype=torch.float64)
    stds = torch.full((4,), 0.5, dtype=torch.float64)
    joint = torch.tensor([0.4, 0.1, 0.1, 0.4], dtype=torch.float64)  # [[0.4, 0.1], [0.1, 0.4]]
    gmm = mixture(joint, means, stds)
    target = torch.full((4,), 0.25, dtype=torch.float64)  # product of the marginals (0.5, 0.5)
    term = JeffreyGuidance(target, joint, classifier=noisy_classifier(gmm))
    n = 2000
    x = _sample(term(gmm.denoiser(NS)), n, steps=100)
    achieved = proportions(assign(gmm, x), 4)
    assert within_two_sigma(achieved, target, n), achieved
    assert mutual_information(joint.reshape(2, 2)) > 0.15
    assert mutual_information(achieved.reshape(2, 2)) < 0.003


def test_tweedie_plugin_gradient_matches_finite_differences():
    x, t, a, s = _states(16)
    term = JeffreyGuidance(PI_STAR, PI, clean_classifier=lambda x0: torch.log(GMM.component_posterior(x0)),
                           estimator="tweedie")
    corr = term(GMM.denoiser(NS)).correction(x, t)
    lw = log_weights(PI_STAR, PI)

    def log_g(xx):  # closed form: log sum_y p(y | D(x)) w(y)
        d = GMM.denoised(xx, a, s)
        return torch.logsumexp(torch.log(GMM.component_posterior(d)) + lw, dim=1)

    h = 1e-6
    fd = torch.stack([(log_g(x + h * e) - log_g(x - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)], 1)
    assert torch.allclose(corr, fd, rtol=1e-5, atol=1e-5)


def test_tweedie_counts_vjp_as_two_model_evals():
    term = JeffreyGuidance(PI_STAR, PI, clean_classifier=lambda x0: torch.log(GMM.component_posterior(x0)),
                           estimator="tweedie")
    res = Sampler(Euler(), TimeUniform(), 5)(term(GMM.denoiser(NS)), torch.randn(3, 2, dtype=torch.float64))
    assert res.nfe == 5 and res.model_evals == 15


@pytest.mark.parametrize("target,match", [
    ([0.5, 0.4, 0.2], "sums to"),
])
def test_bad_target_direct(target, match):
    from diffsample.guidance import parse_target
    with pytest.raises(ValueError, match=match):
        parse_target(target, 3)


def test_zero_model_marginal_is_an_error_not_a_division():
    with pytest.raises(ValueError, match="estimated as 0"):
        _jeffrey(target=torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64),
                 marginal=torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64))
    with pytest.raises(ValueError, match="estimated as 0"):
        _jeffrey(marginal=torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64))


def test_missing_model_marginal_is_a_clear_error():
    guided = JeffreyGuidance(PI_STAR, None, classifier=noisy_classifier(GMM))(GMM.denoiser(NS))
    x, t, _, _ = _states(4)
    with pytest.raises(ValueError, match="model marginal"):
        guided(x, t)


def test_classifier_prior_recovers_the_mixture_weights():
    from diffsample.guidance.jeffrey.class_marginal import classifier_prior

    # at a very noisy level the exact noisy classifier outputs its prior pi
    t_max = NS.t_max
    a, s = alpha_sigma(torch.tensor([t_max]))
    g = torch.Generator().manual_seed(0)
    x = a * GMM.sample(20000, generator=g) + s * torch.randn(20000, 2, generator=g, dtype=torch.float64)
    prior = classifier_prior(noisy_classifier(GMM), x, t_max)
    assert torch.allclose(prior.probs, PI, atol=3e-3)


def test_conditional_variant_sampling_hits_target():
    n = 2000
    term = JeffreyGuidance(PI_STAR, PI, classifier=noisy_classifier(GMM), variant="conditional", prune=1e-6)
    x = _sample(term(ConditionalGMM(GMM)), n, steps=50, eta=0.0)
    p = proportions(assign(TARGET, x), 3)
    assert within_two_sigma(p, PI_STAR, n), p
