"""The exact Gaussian-mixture testbed against independent closed forms."""

import math

import pytest
import torch

from diffsample.solvers import VE, DiscreteVP, LinearVP, RectifiedFlow
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=3, components=5, seed=2)


@pytest.mark.parametrize("alpha, sigma", [(1.0, 0.3), (0.8, 0.6), (0.1, 0.995), (1.0, 5.0)])
def test_denoiser_is_tweedie_of_the_exact_log_density(alpha, sigma):
    """E[x0 | x] = (x + sigma^2 grad log p_t(x)) / alpha, with the gradient taken by autograd."""
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(GMM.log_prob(x, alpha, sigma).sum(), x)
    tweedie = (x + sigma**2 * grad) / alpha
    assert torch.allclose(GMM.denoised(x.detach(), alpha, sigma), tweedie, rtol=1e-10, atol=1e-10)
    assert torch.allclose(GMM.score(x.detach(), alpha, sigma), grad, rtol=1e-10, atol=1e-10)


def test_log_prob_integrates_to_one_in_1d():
    g = GaussianMixture.random(dim=1, components=3, seed=0)
    x = torch.linspace(-6, 6, 20001, dtype=torch.float64)[:, None]
    for alpha, sigma in [(1.0, 0.0), (0.7, 0.7)]:
        p = g.log_prob(x, alpha, sigma).exp()
        assert abs(float(torch.trapezoid(p, x[:, 0])) - 1) < 1e-6


def test_exact_samples_have_the_mixture_moments():
    x = GMM.sample(200_000, generator=torch.Generator().manual_seed(0))
    mean = (GMM.weights[:, None] * GMM.means).sum(0)
    second = (GMM.weights[:, None] * (GMM.means**2 + GMM.stds[:, None] ** 2)).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=4e-3)
    assert torch.allclose((x**2).mean(0), second, atol=6e-3)


@pytest.mark.parametrize("ns", [LinearVP(), VE(), RectifiedFlow(), DiscreteVP.from_config({})], ids=repr)
def test_reference_ode_matches_gaussian_flow_map(ns):
    """For one Gaussian the probability-flow map is closed form; the scipy reference must match."""
    g = GaussianMixture(torch.tensor([[0.3, -0.2, 0.9]]), torch.tensor([0.5]), torch.tensor([1.0]))
    x = torch.randn(8, 3, dtype=torch.float64)
    t0, t1 = ns.t_max_finite, ns.t_min + 0.1 * (ns.t_max_finite - ns.t_min)
    a0, s0 = float(ns.alpha(torch.tensor(t0))), float(ns.sigma(torch.tensor(t0)))
    a1, s1 = float(ns.alpha(torch.tensor(t1))), float(ns.sigma(torch.tensor(t1)))
    std0, std1 = math.hypot(a0 * 0.5, s0), math.hypot(a1 * 0.5, s1)
    exact = a1 * g.means[0] + std1 / std0 * (x - a0 * g.means[0])
    assert torch.allclose(g.reference_ode(x, ns, t0, t1), exact, rtol=1e-7, atol=1e-7)
    # To sigma = 0 the map ends at mu + (s / std0) (x - a0 mu).
    exact0 = g.means[0] + 0.5 / std0 * (x - a0 * g.means[0])
    assert torch.allclose(g.reference_ode(x, ns, t0, None), exact0, rtol=1e-6, atol=1e-6)


def test_eps_model_is_consistent_with_the_denoiser_and_runs_in_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = GaussianMixture.random(dim=2 * 4 * 4, components=3, seed=4)
    model = g.eps_model(sched.alphas_cumprod, sample_shape=(2, 4, 4))
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 998, 999])
    eps = model(x, t).sample
    a = sched.alphas_cumprod[t].double().sqrt().reshape(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t].double()).sqrt().reshape(-1, 1, 1, 1)
    assert torch.allclose((x - s * eps) / a, g.denoised(x, a.flatten(), s.flatten()), rtol=1e-5, atol=1e-6)
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=sched)
    sched.set_timesteps(3)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 4, 4, 2)
