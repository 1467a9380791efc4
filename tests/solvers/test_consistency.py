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


# ---- through attach (the pipeline's own loop over the scheduler shim) -------------------------------


@pytest.fixture(scope="module")
def ddpm_pipe():
    from diffsample.testbed import tiny_pipelines as tp

    return tp.build("ddpm")


@pytest.mark.parametrize("scheduler, solver", [("LCMScheduler", "lcm"), ("TCDScheduler", "tcd")])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_attach_reproduces_the_pipelines_own_lcm_and_tcd_scheduler(ddpm_pipe, scheduler, solver, steps):
    """A DDPM pipeline running diffusers' LCMScheduler / TCDScheduler (eta = 0.3, the pipeline's
    default) gives the same images as the same pipeline with ``attach(pipe, "lcm" / "tcd")``: same
    grid (TCD's last step ends at timestep 0), the pipeline's generator drawing the same noise."""
    from diffsample import attach, detach

    pipe = ddpm_pipe
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config, clip_sample=False)
    try:
        def images():
            return torch.as_tensor(pipe(batch_size=2, num_inference_steps=steps, output_type="np",
                                        generator=torch.Generator().manual_seed(0)).images)

        ref = images()
        attach(pipe, solver)
        try:
            ours = images()
            report = pipe.scheduler.report()
        finally:
            detach(pipe)
    finally:
        pipe.scheduler = original
    assert report["nfe"] == steps and report["model_evals"] == steps
    assert _rel(ours, ref) < 1e-5, f"relative difference {_rel(ours, ref):.2e}"


# ---- guidance on tcd through generate (bundled MNIST model) -----------------------------------------


@pytest.fixture(scope="module")
def mnist():
    from diffsample.run.models import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def tcd_runs(mnist):
    import diffsample

    kw = dict(solver="tcd", schedule="lcm", steps=4, num_samples=8, batch_size=8, seed=0)
    return {spec: diffsample.generate(mnist, guidance=[spec] if spec else [], **kw)
            for spec in ("", "noisetilt:reward=ink,rho=constant,strength=0.5", "best_of_n:reward=ink,n=3")}


def test_noisetilt_acts_on_tcd_draws_with_honest_model_evals(tcd_runs):
    """NoiseTilt replaces tcd's fresh draws through the transition hook: the samples change, the ink
    reward rises, and each of the 4 steps costs 1 forward + 1 backward (2) network pass per sample."""
    from diffsample.guidance.rewards import Ink

    plain, tilted = tcd_runs[""], tcd_runs["noisetilt:reward=ink,rho=constant,strength=0.5"]
    assert plain.record["solver"] == tilted.record["solver"] == "tcd"
    assert (plain.record["nfe"], plain.record["model_evals"]) == (4, 4)
    assert (tilted.record["nfe"], tilted.record["model_evals"]) == (4, 12)
    assert tilted.record["events"]["backward_rows"] == 4 * 8
    assert _rel(tilted.samples, plain.samples) > 0.05
    assert float(Ink()(tilted.samples).mean()) > float(Ink()(plain.samples).mean()) + 0.05


def test_best_of_n_on_tcd_keeps_the_best_chain(tcd_runs):
    """Chain 0 of best-of-3 is the plain run, so every kept sample scores at least the plain one; nfe
    and model_evals count the three sequential chains."""
    from diffsample.guidance.rewards import Ink

    plain, best = tcd_runs[""], tcd_runs["best_of_n:reward=ink,n=3"]
    assert (best.record["nfe"], best.record["model_evals"]) == (12, 12)
    assert (Ink()(best.samples) >= Ink()(plain.samples) - 1e-6).all()
    assert (Ink()(best.samples) > Ink()(plain.samples) + 1e-4).any()


# Every registered guidance term with tcd through generate (bundled MNIST, class 3, 4 lcm-schedule
# steps): it runs with the model_evals per sample the accounting rules give, or is refused in one line.
UNIFORM = "[" + ",".join(["0.1"] * 10) + "]"
TCD_TERMS = {
    "none": ("none", 4, 4),
    "cfg": ("cfg:scale=3", 4, 8),  # two branches per call
    "cfg_rescale": ("cfg_rescale", 4, 8),
    "apg": ("apg", 4, 8),
    "cfgpp": ("cfgpp", "refused", "first-order Euler/DDIM"),
    "cfg_zero_star": ("cfg_zero_star", 4, 8),
    "classifier": ("classifier", 4, 4),  # the classifier is another network
    "jeffrey": (f"jeffrey:target=[3:0.5,8:0.5],model_marginal={UNIFORM}", 4, 4),
    "jeffrey_embedding": ("jeffrey_embedding", "refused", "needs ratio="),
    "noisetilt": ("noisetilt", 4, 12),  # + 1 backward (2) per step
    "dps": ("dps", 4, 12),
    "freedom": ("freedom", 6, 18),  # time-travel repeats add calls
    "svdd": ("svdd:particles=3", 4, 10),  # 2 extra candidates at each of the 3 stochastic steps
    "best_of_n": ("best_of_n:n=2", 8, 8),  # two sequential chains
}


def test_every_registered_term_is_in_the_tcd_table():
    from diffsample import GUIDANCE

    assert set(TCD_TERMS) == set(GUIDANCE.names())


@pytest.mark.parametrize("term", sorted(TCD_TERMS))
def test_tcd_composes_with_every_guidance_term_through_generate(mnist, term):
    import diffsample

    spec, nfe, evals = TCD_TERMS[term]
    kw = dict(solver="tcd", schedule="lcm", steps=4, guidance=[spec], class_label=3, num_samples=2, batch_size=2, seed=0)
    if nfe == "refused":
        with pytest.raises(ValueError, match=evals) as info:
            diffsample.generate(mnist, **kw)
        assert "\n" not in str(info.value)
        return
    result = diffsample.generate(mnist, **kw)
    assert result.record["solver"] == "tcd" and torch.isfinite(result.samples).all()
    assert (result.record["nfe"], result.record["model_evals"]) == (nfe, evals)


# ---- command line ----------------------------------------------------------------------------------


def _cli(*args):
    from click.testing import CliRunner

    from diffsample.cli.main import main

    return CliRunner().invoke(main, list(args))


def test_cli_generate_with_tcd_on_the_bundled_model(tmp_path):
    import json

    out = tmp_path / "o"
    result = _cli("generate", "--solver", "tcd", "--steps", "4", "--num-samples", "2", "-q", "--out", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["solver"] == "tcd" and record["nfe"] == 4 and record["model_evals"] == 4


@pytest.mark.parametrize("args, message", [
    (["--solver", "tcd:gamma=1.5"], "tcd gamma must be in [0, 1]"),
    (["--solver", "tcd:gamma=-0.2"], "got -0.2"),
    (["--solver", "lcm", "--schedule", "lcm", "--steps", "51"], "cannot give 51 points"),
    (["--solver", "tcd", "--schedule", "lcm:original_inference_steps=4", "--steps", "8"], "valid: 1 to 4"),
    (["--solver", "lcm:boundary=maybe"], "boundary"),
])
def test_cli_refuses_bad_consistency_options_with_exit_2(tmp_path, args, message):
    out = tmp_path / "o"
    result = _cli("generate", "--num-samples", "2", "-q", "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
