"""Twisted SMC (TDS) for Jeffrey guidance on the exact GMM (docs/methods/jeffrey.md#twisted-smc-jeffreyparticlesk).

The Tweedie plug-in ``p(y | D(x_t))`` is a biased estimate of ``p_t(y | x_t)``: one guided chain
under-corrects toward the target proportions. As the twist of twisted SMC it is corrected by
importance weights, so the proportions approach ``pi*`` as the number of particles grows.
"""

import math

import pytest
import torch

from diffsample.guidance import GUIDANCE, TDS, JeffreyGuidance, Resources
from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, Euler, TimeUniform

from .gmm_models import NS, PI, PI_STAR, assign, mixture, noisy_classifier, proportions, within_two_sigma

GMM = mixture(PI)


def clean_classifier(x0):
    return torch.log(GMM.component_posterior(x0))


def _term(tds=None, estimator="tweedie", **kw):
    return JeffreyGuidance(PI_STAR, PI, classifier=noisy_classifier(GMM), clean_classifier=clean_classifier,
                           estimator=estimator, tds=tds, **kw)


def _run(term, n, steps=50, solver=None, seed=0, final="zero"):
    torch.manual_seed(seed)
    noise = torch.randn(n, 2, dtype=torch.float64)
    return Sampler(solver or Euler(eta=1.0), TimeUniform(), steps, final=final)(term(GMM.denoiser(NS)), noise)


def test_tds_removes_the_plugin_bias():
    n = 600
    plain = proportions(assign(GMM, _run(_term(), 4000).x), 3)
    assert plain[2] < PI_STAR[2] - 0.03  # the plug-in under-corrects
    res = _run(_term(TDS(particles=64)), n)
    tds = proportions(assign(GMM, res.x), 3)
    assert within_two_sigma(tds, PI_STAR, n), tds
    assert float((tds - PI_STAR).abs().max()) < float((plain - PI_STAR).abs().max())
    assert res.events["tds_resample"] > 0 and res.events["tds_particles"] == 64 * n


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2m_sde"])
def test_uncapped_single_particle_is_the_plain_guided_chain(solver):
    # final="last": no deterministic last step (TDS takes the unguided move there)
    plain = _run(_term(), 64, solver=SOLVERS.create(solver), final="last").x
    one = _run(_term(TDS(particles=1, max_shift=math.inf)), 64, solver=SOLVERS.create(solver), final="last").x
    assert torch.allclose(plain, one, rtol=0, atol=1e-12)  # mean_base + (mean - mean_base): rounding only


def test_base_proposal_with_weights_alone_hits_the_target():
    # scale = 0: particles follow the unguided sampler; the twist and the final potential G(x0) do all the work
    res = _run(_term(TDS(particles=64), scale=0.0), 500)
    assert within_two_sigma(proportions(assign(GMM, res.x), 3), PI_STAR, 500)


def test_multistep_sde_solver_resamples_its_history():
    res = _run(_term(TDS(particles=16), estimator="noisy"), 400, solver=SOLVERS.create("dpmpp_2m_sde"))
    p = proportions(assign(GMM, res.x), 3)
    assert within_two_sigma(p, PI_STAR, 400), p


def test_cost_accounting_is_k_times_per_output():
    plain = _run(_term(estimator="noisy"), 8, steps=10)
    tds = _run(_term(TDS(particles=5), estimator="noisy"), 8, steps=10)
    assert tds.nfe == plain.nfe == 10
    assert tds.model_evals == pytest.approx(5 * plain.model_evals)
    assert tds.x.shape == (8, 2)


def test_registry_option_particles():
    res = Resources(classifier=noisy_classifier(GMM), num_classes=3)
    term = GUIDANCE.create("jeffrey:target=0:0.2;1:0.2;2:0.6,model_marginal=0.5;0.3;0.2,particles=4,ess=0.7",
                           resources=res)
    assert term.tds == TDS(4, 0.7)
    assert GUIDANCE.create("jeffrey:target=0:0.2;1:0.2;2:0.6", resources=res).tds is None


@pytest.mark.parametrize("kw, match", [
    ({"particles": 0}, "particles"), ({"particles": 2.5}, "particles"), ({"ess": 1.5}, "ess"),
    ({"resample": "stratified"}, "valid: systematic, multinomial"), ({"max_shift": 0.0}, "max_shift"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TDS(**kw)


def test_deterministic_solver_and_conditional_variant_are_refused():
    with pytest.raises(ValueError, match="deterministic.*stochastic solver"):
        _run(_term(TDS(4)), 4, solver=Euler(eta=0.0))
    with pytest.raises(ValueError, match="variant='score'"):
        _term(TDS(4), estimator="noisy", variant="conditional")
