"""Every stochastic solver of the breadth set (issue 17): weak correctness on exact data (sample mean
and covariance of a Gaussian and of a Gaussian mixture at many steps, to statistical tolerance), and
reward guidance through ``generate`` (NoiseTilt and SVDD change the samples through the transition
hook; best-of-N keeps, per sample, a chain at least as good as the plain run)."""

from __future__ import annotations

import math

import pytest
import torch

import diffsample
from diffsample.guidance.rewards import Ink
from diffsample.guidance.term import Resources
from diffsample.run.models import LoadedModel
from diffsample.samplers import Sampler
from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.solvers import SOLVERS, DiscreteVP, Karras, LinearVP
from diffsample.testbed.gmm import GaussianMixture

BREADTH = [n for n in ("dpmpp_2s_ancestral", "dpmpp_sde", "sa_solver", "sa_solver_pece", "er_sde", "seeds_2", "seeds_3",
                     "restart")
           if n in SOLVERS]

MU, S = torch.tensor([0.5, -0.3, 1.2], dtype=torch.float64), 0.4
GAUSS = GaussianMixture(MU[None], torch.tensor([S]), torch.tensor([1.0]))
MIX = GaussianMixture(torch.tensor([[-1.0, 0.5], [0.8, -0.4], [0.3, 1.1]], dtype=torch.float64),
                      torch.tensor([0.3, 0.5, 0.2]), torch.tensor([0.5, 0.3, 0.2]))


# the weak limit needs every part of the run refined: Restart's jump segments too (the coarse Heun
# segments are the error whatever the main grid): the default intervals with 41 sigmas each
AT_MANY_STEPS = {"restart": "restart:segments=[[41,2,0.06,0.30],[41,1,0.30,0.59]]"}


def _sample(name, data, n, steps, seed=0):
    name = AT_MANY_STEPS.get(name, name)
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *_: torch.randn(n, data.dim, dtype=torch.float64, generator=gen)  # noqa: E731
    return Sampler(SOLVERS.create(name), Karras(), steps)(data.denoiser(LinearVP()), draw(), noise_fn=draw).x


def _mixture_moments(gmm):
    w, mu, s2 = gmm.weights, gmm.means, gmm.stds**2
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (s2[:, None, None] * torch.eye(gmm.dim, dtype=torch.float64)
                                  + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


@pytest.mark.parametrize("name", BREADTH)
def test_gaussian_moments_at_many_steps(name):
    n = 4000
    x = _sample(name, GAUSS, n, 120)
    assert torch.all((x.mean(0) - MU).abs() < 4 * S / math.sqrt(n)), x.mean(0)
    # sample std: standard error S / sqrt(2 n); 4 errors plus 2 % discretisation bias allowed
    assert torch.all((x.std(0) - S).abs() < 4 * S / math.sqrt(2 * n) + 0.02 * S), x.std(0)


@pytest.mark.parametrize("name", BREADTH)
def test_mixture_mean_and_covariance_at_many_steps(name):
    n = 4000
    x = _sample(name, MIX, n, 120, seed=10_000)
    mean, cov = _mixture_moments(MIX)
    exact = MIX.sample(200_000, generator=torch.Generator().manual_seed(0))
    centred = exact - mean
    se_mean = exact.std(0) / math.sqrt(n)
    se_cov = (centred[:, :, None] * centred[:, None, :]).std(0) / math.sqrt(n)
    assert torch.all((x.mean(0) - mean).abs() < 4 * se_mean), (x.mean(0), mean)
    assert torch.all((torch.cov(x.T) - cov).abs() < 4 * se_cov + 0.02 * cov.abs().max()), (torch.cov(x.T), cov)


def _gmm_model() -> LoadedModel:
    """A Gaussian mixture as an x0-prediction network on a discrete VP process (generate's model path)."""
    gmm, ns, shape = GaussianMixture.random(dim=8, components=3, seed=4, spread=0.6), DiscreteVP.from_config({}), (2, 2, 2)

    def model_fn(x, t, **kwargs):
        t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return gmm.denoised(x.reshape(x.shape[0], -1).double(), ns.alpha(t64), ns.sigma(t64)).reshape(x.shape).to(x.dtype)

    return LoadedModel("gmm", ModelDenoiser(model_fn, ns, "sample"), shape, Resources(), None, None,
                       torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", BREADTH)
def test_reward_guidance_acts_through_generate(name):
    model = _gmm_model()
    run = lambda guidance=(): diffsample.generate(model, solver=name, schedule="karras", steps=6,  # noqa: E731
                                                  num_samples=6, seed=3, guidance=guidance)
    base = run()
    for spec in ("noisetilt:reward=ink,rho=constant,strength=0.5", "svdd:reward=ink,particles=4"):
        guided = run([spec])
        assert guided.record["solver"] == name
        assert (guided.samples - base.samples).abs().max() > 1e-3, f"{spec} left {name}'s samples unchanged"
    best = run(["best_of_n:reward=ink,n=3"])
    ink = Ink()
    assert torch.all(ink(best.samples.double()) >= ink(base.samples.double()) - 1e-6)
    assert (best.samples - base.samples).abs().max() > 1e-3
