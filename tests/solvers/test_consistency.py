"""Consistency-style sampling (``lcm``, ``tcd``) and the ``lcm`` step schedule against diffusers'
LCMScheduler / TCDScheduler, driven with the same model, grid and noise; exact identities
(``tcd:gamma=0`` is DDIM, ``tcd:gamma=1`` is ``lcm`` without its boundary condition); the
re-noising goes through the transition hook; bad options are refused in one line."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffsample.samplers import Sampler, from_eps  # noqa: E402
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, DiscreteVP, Euler, LinearVP, RectifiedFlow, fixed  # noqa: E402
from diffsample.solvers.consistency import LCM, TCD  # noqa: E402
from diffsample.solvers.lcm_schedule import LCMSchedule  # noqa: E402
from diffsample.solvers.solver import Grid  # noqa: E402
from diffsample.solvers.transition import use_transition  # noqa: E402
from diffsample.testbed.gmm import GaussianMixture  # noqa: E402

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
GMM = GaussianMixture.random(dim=8, components=6, seed=3)
B = 32


def _diffusers_run(sched, model, noise, steps, gen, **step_kw):
    """diffusers' own loop (as LatentConsistencyModelPipeline / StableDiffusionXLPipeline with TCD):
    the output is LCM's last ``denoised`` / TCD's last ``prev_sample``."""
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = sched.step(model(x, t).sample, t, x, generator=gen, **step_kw)
        x = out.prev_sample
    return (out.denoised if isinstance(sched, diffusers.LCMScheduler) else x), sched.timesteps.clone()


def _ours(solver, model, noise, timesteps, gen, final="zero"):
    ns = DiscreteVP.from_config(SD_BETAS)
    denoiser = from_eps(lambda x, t: model(x, t).sample, ns)
    points = timesteps.tolist() + ([0.0] if final == "last" else [])
    draw = lambda s, s_next: torch.randn(noise.shape, generator=gen, dtype=noise.dtype)  # noqa: E731
    return Sampler(solver, fixed(points), len(timesteps), final=final)(denoiser, noise, noise_fn=draw)


def _pair(sched, solver, steps, final="zero", **step_kw):
    model = GMM.eps_model(sched.alphas_cumprod)
    noise = torch.randn(B, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    ref, timesteps = _diffusers_run(sched, model, noise, steps, torch.Generator().manual_seed(7), **step_kw)
    ours = _ours(solver, model, noise, timesteps, torch.Generator().manual_seed(7), final)
    return ours, ref, timesteps


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers_lcm_scheduler(steps):
    ours, ref, timesteps = _pair(diffusers.LCMScheduler(**SD_BETAS), SOLVERS.create("lcm"), steps)
    assert ours.nfe == steps and timesteps.tolist() == LCMSchedule()(DiscreteVP.from_config(SD_BETAS), steps).tolist()
    assert _rel(ours.x, ref) < 1e-5, f"relative difference {_rel(ours.x, ref):.2e}"


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_boundary_condition_matches_diffusers_where_it_matters(steps):
    """At diffusers' timestep_scaling=10 the boundary condition moves x0 by < 1e-6 on these grids; at
    timestep_scaling=0.002 it is an O(1) change, still reproduced, and dropping it breaks the match."""
    sched = diffusers.LCMScheduler(**SD_BETAS, timestep_scaling=0.002)
    ours, ref, _ = _pair(sched, SOLVERS.create("lcm:timestep_scaling=0.002"), steps)
    assert _rel(ours.x, ref) < 1e-5, f"relative difference {_rel(ours.x, ref):.2e}"
    unbounded, ref, _ = _pair(diffusers.LCMScheduler(**SD_BETAS, timestep_scaling=0.002), LCM(boundary=False), steps)
    assert _rel(unbounded.x, ref) > 1e-2
    for t in [0, 19, 259, 999]:
        assert LCM().boundary_scalings(float(t)) == pytest.approx(
            diffusers.LCMScheduler(**SD_BETAS).get_scalings_for_boundary_condition_discrete(t), rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_tcd_matches_diffusers_tcd_scheduler(steps, gamma):
    """diffusers' TCD ends at timestep 0 (alpha^2 = 1 - beta_0), not at sigma = 0: the same grid
    with ``final="last"`` reproduces it."""
    ours, ref, _ = _pair(diffusers.TCDScheduler(**SD_BETAS), SOLVERS.create(f"tcd:gamma={gamma}"), steps,
                         final="last", eta=gamma)
    assert ours.nfe == steps
    assert _rel(ours.x, ref) < 1e-5, f"relative difference {_rel(ours.x, ref):.2e}"


def test_tcd_default_gamma_is_diffusers_default_eta():
    import inspect

    assert TCD().gamma == inspect.signature(diffusers.TCDScheduler.step).parameters["eta"].default == 0.3
    assert SOLVERS.create("tcd").gamma == 0.3


@pytest.mark.parametrize("original", [10, 50, 100])
def test_lcm_schedule_matches_diffusers_timesteps(original):
    ns = DiscreteVP.from_config(SD_BETAS)
    # TCDScheduler.set_timesteps(original_inference_steps=m) switches to all N timesteps (a diffusers
    # quirk), so both schedulers get m from their config, which takes the skipping path.
    for cls in (diffusers.LCMScheduler, diffusers.TCDScheduler):
        sched = cls(**SD_BETAS, original_inference_steps=original)
        for steps in sorted({1, 2, 3, 4, 7, 8, original}):
            sched.set_timesteps(steps)
            ours = STEP_SCHEDULES.create(f"lcm:original_inference_steps={original}")(ns, steps)
            assert ours.tolist() == sched.timesteps.double().tolist(), (cls.__name__, steps)
    assert LCMSchedule()(ns, 4).tolist() == [999.0, 759.0, 499.0, 259.0]


def _gmm_run(solver, ns, steps=6, seed=0):
    t = torch.linspace(ns.t_max_finite, ns.t_min + 0.02, steps, dtype=torch.float64)
    noise = torch.randn(B, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    draw = lambda s, s_next: torch.randn(B, 8, dtype=torch.float64, generator=gen)  # noqa: E731
    return Sampler(solver, fixed(t.tolist()), steps)(GMM.denoiser(ns), noise, noise_fn=draw)


@pytest.mark.parametrize("ns", [LinearVP(), RectifiedFlow(t_min=1e-3, t_max_finite=0.999)], ids=["vp", "flow"])
def test_tcd_gamma_0_is_ddim_and_gamma_1_is_lcm_without_boundary(ns):
    assert torch.allclose(_gmm_run(TCD(gamma=0.0), ns).x, _gmm_run(Euler(), ns).x, rtol=1e-10, atol=1e-12)
    assert torch.allclose(_gmm_run(TCD(gamma=1.0), ns).x, _gmm_run(LCM(boundary=False), ns).x, rtol=1e-10, atol=1e-12)


def test_tcd_renoising_keeps_the_forward_marginal():
    """Step 2 alone: with the exact denoiser of single-Gaussian data ``N(mu, c^2)``, the DDIM jump
    from the exact marginal at t to s and the forward kernel back to t_next give a Gaussian with the
    kernel's exact mean and variance (computed by hand below)."""
    ns = LinearVP()
    mu, c = 0.7, 0.5
    gauss = GaussianMixture(torch.tensor([[mu]], dtype=torch.float64), torch.tensor([c], dtype=torch.float64),
                            torch.ones(1, dtype=torch.float64))
    grid = Grid.from_t(ns, torch.tensor([0.8, 0.4], dtype=torch.float64))
    a, s = grid.alpha_list[0], grid.sigma_list[0]
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    x = a * (mu + c * torch.randn(n, 1, dtype=torch.float64, generator=gen)) + s * torch.randn(n, 1, dtype=torch.float64, generator=gen)
    solver = TCD(gamma=0.5)
    x_next, _ = solver.step(gauss.denoiser(ns), x, grid, 0, None,
                            lambda *_: torch.randn(n, 1, dtype=torch.float64, generator=gen))
    # Hand computation: D = mu + a c^2 (x - a mu) / v, v = a^2 c^2 + s^2; x_s = a_s D + s_s (x - a D) / s.
    t_s = 0.5 * 0.4
    a_s, s_s = float(ns.alpha(torch.tensor(t_s))), float(ns.sigma(torch.tensor(t_s)))
    an, sn = grid.alpha_list[1], grid.sigma_list[1]
    v = a**2 * c**2 + s**2
    g = (a_s - s_s * a / s) * a * c**2 / v + s_s / s  # d x_s / d x
    var_s = g**2 * v
    var_next = (an / a_s) ** 2 * var_s + sn**2 - (an / a_s) ** 2 * s_s**2
    assert abs(float(x_next.mean()) - an * mu) < 4 * var_next**0.5 / n**0.5
    assert abs(float(x_next.var()) / var_next - 1) < 0.02


def _recording_transition(log):
    def transition(mean, std, grid, i, draw):
        log.append((i, std))
        return mean + std * draw()
    return transition


@pytest.mark.parametrize("spec", ["lcm", "tcd", "tcd:gamma=1", "tcd:gamma=0"])
def test_every_fresh_draw_goes_through_the_transition_hook(spec):
    """One draw per step except the last (the step to sigma = 0), each through the hook with std > 0;
    gamma = 0 draws nothing."""
    ns = DiscreteVP.from_config(SD_BETAS)
    solver = SOLVERS.create(spec)
    grid = Grid.from_t(ns, LCMSchedule()(ns, 4), final_zero=True)
    log, draws = [], [0]

    def noise_fn(s, s_next):
        draws[0] += 1
        return torch.randn(B, 8, dtype=torch.float64)

    x = torch.randn(B, 8, dtype=torch.float64)
    state = solver.init(x, grid)
    with torch.no_grad(), use_transition(_recording_transition(log)):
        for i in range(grid.steps):
            x, state = solver.step(GMM.denoiser(ns), x, grid, i, state, noise_fn if solver.stochastic else None)
    expected = 3 if solver.stochastic else 0
    assert draws[0] == len(log) == expected and [i for i, _ in log] == list(range(expected))
    assert all(std > 0 for _, std in log)
    if spec == "lcm":  # LCM's kernel std is sigma_next
        assert [std for _, std in log] == pytest.approx(list(grid.sigma_list[1:4]), rel=1e-12)


def test_tcd_gamma_0_draws_nothing():
    ns = DiscreteVP.from_config(SD_BETAS)
    solver = TCD(gamma=0.0)
    assert not solver.stochastic
    result = Sampler(solver, LCMSchedule(), 4)(GMM.denoiser(ns), torch.randn(B, 8, dtype=torch.float64))
    assert torch.isfinite(result.x).all()


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "a", True])
def test_tcd_refuses_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\].*got") as info:
        TCD(gamma=gamma)
    assert "\n" not in str(info.value)


def test_tcd_registry_refuses_gamma_outside_unit_interval():
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\].*1\.5"):
        SOLVERS.create("tcd:gamma=1.5")


@pytest.mark.parametrize("steps", [51, 100])
def test_lcm_schedule_refuses_more_points_than_the_distillation_grid(steps):
    ns = DiscreteVP.from_config(SD_BETAS)
    with pytest.raises(ValueError, match=rf"cannot give {steps} points.*valid: 1 to 50") as info:
        LCMSchedule()(ns, steps)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_lcm_schedule_refuses_bad_original_inference_steps(bad):
    with pytest.raises(ValueError, match="original_inference_steps must be an integer >= 1"):
        LCMSchedule(bad)


def test_lcm_boundary_needs_a_discrete_vp_schedule():
    from diffsample.solvers import VE

    ns = VE()
    grid = Grid.from_t(ns, torch.tensor([10.0, 1.0], dtype=torch.float64), final_zero=True)
    with pytest.raises(ValueError, match="needs a discrete-VP schedule.*valid: boundary=None"):
        LCM(boundary=True).init(torch.zeros(1, 2), grid)
    assert not LCM().applies_boundary(ns) and LCM().applies_boundary(DiscreteVP.from_config(SD_BETAS))
