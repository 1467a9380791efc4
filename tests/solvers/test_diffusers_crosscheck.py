"""Our solvers reproduce diffusers' multistep schedulers on the exact GMM eps-model, step for step,
when given the same timesteps."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffsample.samplers import Sampler, from_eps  # noqa: E402
from diffsample.solvers import DiscreteVP, DPMSolverPP, UniPC, fixed  # noqa: E402
from diffsample.testbed.gmm import GaussianMixture  # noqa: E402

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _run_diffusers(scheduler, model, noise, steps):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x, scheduler.timesteps.clone()


def _run_ours(solver, model, noise, timesteps, config, final_sigmas_type="zero"):
    ns = DiscreteVP.from_config(config)
    denoiser = from_eps(lambda x, t: model(x, t).sample, ns)
    if final_sigmas_type == "zero":
        sampler = Sampler(solver, fixed(timesteps.tolist()), len(timesteps), final="zero")
    else:  # diffusers "sigma_min": stop at timestep 0
        sampler = Sampler(solver, fixed(timesteps.tolist() + [0.0]), len(timesteps), final="last")
    return sampler(denoiser, noise)


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(dim=8, components=6, seed=3)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_matches_diffusers(gmm, spacing, steps, order):
    config = dict(SD_BETAS, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched = diffusers.DPMSolverMultistepScheduler(**config, solver_order=order, algorithm_type="dpmsolver++")
    ac = sched.alphas_cumprod
    model = gmm.eps_model(ac)
    noise = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    ref, timesteps = _run_diffusers(sched, model, noise, steps)
    ours = _run_ours(DPMSolverPP(order=order, third_order="reference"), model, noise, timesteps, config)
    assert ours.nfe == steps
    rel = (ours.x - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative difference {rel:.2e}"


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(gmm, variant, steps, order, final):
    if variant == "bh1" and final == "zero":
        pytest.skip("diffusers' bh1 returns NaN on the step to sigma = 0; see test_diffusers_unipc_bh1_nan_and_ours_finite")
    config = dict(SD_BETAS, timestep_spacing="linspace")
    sched = diffusers.UniPCMultistepScheduler(**config, solver_order=order, solver_type=variant,
                                              final_sigmas_type=final)
    model = gmm.eps_model(sched.alphas_cumprod)
    noise = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    ref, timesteps = _run_diffusers(sched, model, noise, steps)
    ours = _run_ours(UniPC(predictor_order=order, variant=variant), model, noise, timesteps, config, final)
    assert ours.nfe == steps
    rel = (ours.x - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative difference {rel:.2e}"


def test_diffusers_unipc_bh1_nan_and_ours_finite(gmm):
    """Documents the diffusers behaviour our solver avoids (issue: UniPC bh1 default final sigma)."""
    sched = diffusers.UniPCMultistepScheduler(**SD_BETAS, solver_type="bh1")
    model = gmm.eps_model(sched.alphas_cumprod)
    noise = torch.randn(16, 8, dtype=torch.float64)
    ref, timesteps = _run_diffusers(sched, model, noise, 10)
    ours = _run_ours(UniPC(variant="bh1"), model, noise, timesteps, SD_BETAS)
    assert not torch.isfinite(ref).all()  # the diffusers bug this guards against
    assert torch.isfinite(ours.x).all()
    # Ours equals diffusers' bh2, whose last step is the same finite limit x = D.
    sched2 = diffusers.UniPCMultistepScheduler(**SD_BETAS, solver_type="bh2")
    ref2, _ = _run_diffusers(sched2, model, noise, 10)
    ours2 = _run_ours(UniPC(variant="bh2"), model, noise, timesteps, SD_BETAS)
    assert torch.isfinite(ours2.x).all() and (ours2.x - ref2).norm() / ref2.norm() < 1e-5


def test_time_uniform_matches_diffusers_timesteps():
    from diffsample.solvers import TimeUniform

    ns = DiscreteVP.from_config(SD_BETAS)
    for spacing, offset in [("linspace", 0), ("leading", 1), ("trailing", 0)]:
        for steps in [1, 4, 7, 10, 25, 50]:
            sched = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=offset)
            sched.set_timesteps(steps)
            ours = TimeUniform(spacing, steps_offset=offset)(ns, steps)
            assert ours.tolist() == sched.timesteps.double().tolist(), (spacing, steps)


def test_discrete_vp_matches_diffusers_alphas():
    for kind in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        sched = diffusers.DDPMScheduler(beta_schedule=kind)
        ns = DiscreteVP.from_config(sched.config)
        t = torch.arange(1000, dtype=torch.float64)
        assert torch.allclose(ns.alpha(t) ** 2, sched.alphas_cumprod.double(), rtol=1e-6, atol=0)
