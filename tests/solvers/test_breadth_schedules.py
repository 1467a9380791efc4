"""The peer step schedules (ComfyUI / k-diffusion / A1111 / diffusers) against the peers' numbers:
diffusers' AYS lists and DDIM / Euler timesteps, ComfyUI's GITS table values, the closed forms of
KL-optimal, Laplace, VP, linear-quadratic and the Beta quantiles, and the explicit sigma /
timestep lists through the registry, the sampler and the CLI."""

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, VE, DiscreteVP, LinearVP, RectifiedFlow
from diffsample.solvers.step_schedules_explicit import Sigmas, Timesteps
from diffsample.solvers.step_schedules_sigma import KLOptimal, Laplace, LinearQuadratic, VPSigmas
from diffsample.solvers.step_schedules_table import DDIMUniform, Normal, SDTurbo, Simple
from diffsample.solvers.step_schedules_tuned import GITS, GITS_COEFFS, GITS_TABLE, AlignYourSteps, gits_sigmas_sd15

SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD_NS = DiscreteVP.from_config(SD)
NEW = ["beta", "kl_optimal", "linear_quadratic", "sgm_uniform", "simple", "normal", "ddim_uniform", "laplace", "vp",
       "sd_turbo", "align_your_steps", "gits"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- closed forms ------------------------------------------------------------------------------
def test_kl_optimal_is_uniform_in_arctan_sigma():
    """AYS Theorem 3.1: the KL-optimal schedule is linear in arctan(sigma) from sigma_max to sigma_min."""
    ns = VE(0.002, 80.0)
    s = ns.sigma_ve(KLOptimal()(ns, 10))
    expected = torch.tan(torch.linspace(math.atan(80.0), math.atan(0.002), 10, dtype=torch.float64))
    assert torch.allclose(s, expected, rtol=1e-12)
    assert torch.allclose(torch.atan(s).diff(), torch.atan(s).diff()[0].expand(9), rtol=1e-10)
    assert KLOptimal()(ns, 1).tolist() == pytest.approx([80.0], rel=1e-12)


def test_laplace_matches_get_sigmas_laplace_formula():
    ns = VE(0.002, 80.0)
    x = np.linspace(0, 1, 7)
    lmb = 0.3 - 0.8 * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5)
    expected = np.clip(np.exp(lmb), 0.002, 80.0)
    got = ns.sigma_ve(Laplace(mu=0.3, beta=0.8)(ns, 7)).numpy()
    assert np.allclose(got, expected, rtol=1e-12)


def test_vp_on_linear_vp_is_k_diffusion_get_sigmas_vp_and_uniform_in_time():
    ns = LinearVP()  # beta_1 - beta_0 = 19.9 = k-diffusion's beta_d
    t = VPSigmas()(ns, 6)
    s = torch.linspace(1, 1e-3, 6, dtype=torch.float64)
    assert torch.allclose(t, s, rtol=1e-9)
    assert torch.allclose(ns.sigma_ve(t), torch.sqrt(torch.expm1(19.9 * s**2 / 2 + 0.1 * s)), rtol=1e-9)
    # A narrower process keeps the law, cut to its range: VE(0.002, 80) starts at sigma 80.
    s_ve = VE(0.002, 80.0).sigma_ve(VPSigmas()(VE(0.002, 80.0), 5))
    assert s_ve[0] == pytest.approx(80.0, rel=1e-9) and s_ve[-1] == pytest.approx(math.sqrt(math.expm1(19.9e-6 / 2 + 1e-4)))


def test_linear_quadratic_by_hand():
    """ComfyUI / Mochi, 4 steps, threshold 0.025: linear 0, 0.0125; quadratic 0.025, 0.275; then 1."""
    assert LinearQuadratic().fractions(4) == pytest.approx([1.0, 0.9875, 0.975, 0.725], abs=1e-12)
    assert RectifiedFlow().t_max == 1.0
    assert LinearQuadratic()(RectifiedFlow(), 4).tolist() == pytest.approx([1.0, 0.9875, 0.975, 0.725], abs=1e-12)
    s = VE(0.002, 80.0).sigma_ve(LinearQuadratic()(VE(0.002, 80.0), 4))  # VE: u * sigma_max
    assert s.tolist() == pytest.approx([80.0, 79.0, 78.0, 58.0], rel=1e-12)
    assert LinearQuadratic().fractions(1) == [1.0]


def test_beta_quantiles_and_rounding():
    from scipy import stats

    t = STEP_SCHEDULES.create("beta")(SD_NS, 10)
    expected = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, 10, endpoint=False), 0.6, 0.6) * 999)
    assert t.tolist() == expected.tolist()
    assert t.tolist() == [999.0, 959.0, 876.0, 765.0, 637.0, 500.0, 362.0, 234.0, 123.0, 40.0]
    # Many steps: rounding would repeat timesteps; the unrounded quantiles keep n distinct points.
    many = STEP_SCHEDULES.create("beta")(SD_NS, 400)
    assert many.numel() == 400 and bool((many.diff() < 0).all())


# ---- ComfyUI timestep-table schedules vs diffusers ------------------------------------------------
def test_table_schedules_by_hand_on_sd():
    assert Simple()(SD_NS, 4).tolist() == [999, 749, 499, 249]
    assert Normal()(SD_NS, 5).tolist() == [999, 749.25, 499.5, 249.75, 0]
    assert Normal(sgm=True)(SD_NS, 4).tolist() == [999, 749.25, 499.5, 249.75]
    assert DDIMUniform()(SD_NS, 4).tolist() == [751, 501, 251, 1]
    assert SDTurbo()(SD_NS, 4).tolist() == [999, 899, 799, 699]


@pytest.mark.parametrize("n", [3, 4, 7, 10, 25])
def test_ddim_uniform_is_diffusers_ddim_leading_offset_1(n):
    import diffusers

    sched = diffusers.DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(n)
    assert DDIMUniform()(SD_NS, n).tolist() == sched.timesteps.double().tolist()


@pytest.mark.parametrize("n", [3, 8, 20])
def test_normal_is_diffusers_euler_linspace_timesteps(n):
    import diffusers

    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    sched.set_timesteps(n)
    assert torch.allclose(Normal()(SD_NS, n), sched.timesteps.double(), atol=1e-4)


def test_sd_turbo_ten_steps_is_diffusers_trailing():
    import diffusers

    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    sched.set_timesteps(10)
    assert SDTurbo()(SD_NS, 10).tolist() == sched.timesteps.double().tolist()
    assert SDTurbo()(SD_NS, 12).tolist() == STEP_SCHEDULES.create("trailing")(SD_NS, 12).tolist()


def test_continuous_table_is_comfy_flow_table():
    """On rectified flow the table is t = 0.001 .. 1 in steps of 0.001 (ComfyUI's flow models)."""
    t = Simple()(RectifiedFlow(), 4)
    assert torch.allclose(t, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), atol=1e-12)


# ---- Align Your Steps vs diffusers' AysSchedules ------------------------------------------------
@pytest.mark.parametrize("model, key", [("sd15", "StableDiffusion"), ("sdxl", "StableDiffusionXL"),
                                        ("svd", "StableDiffusionVideo")])
def test_ays_ten_steps_are_diffusers_sigmas(model, key):
    from diffusers.schedulers.scheduling_utils import AysSchedules

    ns = VE(0.002, 800.0)
    sigmas = AysSchedules[f"{key}Sigmas"]
    got = ns.sigma_ve(AlignYourSteps(model)(ns, 10))
    assert got.tolist() == pytest.approx(sigmas[:10], rel=1e-12) and sigmas[10] == 0.0
    grid = Sampler(SOLVERS.create("euler"), STEP_SCHEDULES.create(f"align_your_steps:model={model}"), 10).grid(ns)
    assert grid.sigma_list[-1] == 0.0


@pytest.mark.parametrize("model, key", [("sd15", "StableDiffusion"), ("sdxl", "StableDiffusionXL")])
def test_ays_on_sd_gives_diffusers_timesteps(model, key):
    from diffusers.schedulers.scheduling_utils import AysSchedules

    t = AlignYourSteps(model)(SD_NS, 10)
    assert (t - torch.tensor(AysSchedules[f"{key}Timesteps"], dtype=torch.float64)).abs().max() < 1.0


def test_ays_log_linear_interpolation():
    table = np.array([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])
    ays = AlignYourSteps("sd15")
    assert np.allclose(ays.sigmas(5), table[0:10:2], rtol=1e-12)  # 11 -> 6 points keeps every other
    s20 = ays.sigmas(20)
    assert np.allclose(s20[::2], table[:10], rtol=1e-12)  # 11 -> 21 points keeps every table value
    assert s20[1] == pytest.approx(math.sqrt(table[0] * table[1]), rel=1e-12)  # midpoints: geometric means
    assert ays.sigmas(1).tolist() == pytest.approx([14.615], rel=1e-12)


# ---- GITS vs ComfyUI's published table -----------------------------------------------------------
# Rows of ComfyUI's GITSScheduler NOISE_LEVELS (the authors' values), copied at full precision.
COMFY_GITS = {
    (0.80, 3): [14.61464119, 11.54541874, 6.77309084, 0.02916753],
    (1.20, 10): [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                 0.19894916, 0.09824532, 0.02916753],
    (1.05, 8): [14.61464119, 7.49001646, 4.86714602, 2.84484982, 1.61558151, 0.95350921, 0.52423614, 0.22545385,
                0.02916753],
    (1.50, 20): [14.61464119, 2.45070267, 1.41535246, 0.95350921, 0.72133851, 0.57119018, 0.4783645, 0.43325692,
                 0.38853383, 0.36617002, 0.34370604, 0.32104823, 0.29807833, 0.27464288, 0.25053367, 0.22545385,
                 0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753],
    (1.00, 16): [14.61464119, 11.54541874, 8.75849152, 7.49001646, 5.85520077, 4.65472794, 3.75677586, 3.07277966,
                 2.45070267, 1.84880662, 1.36964464, 1.01931262, 0.72133851, 0.45573691, 0.25053367, 0.09824532,
                 0.02916753],
    (1.25, 10): [14.61464119, 5.85520077, 2.84484982, 1.61558151, 0.98595673, 0.64427125, 0.43325692, 0.27464288,
                 0.17026083, 0.09824532, 0.02916753],
}


@pytest.mark.parametrize("key", list(COMFY_GITS), ids=str)
def test_gits_rows_match_comfyui(key):
    coeff, steps = key
    assert gits_sigmas_sd15(coeff, steps) == pytest.approx(COMFY_GITS[key], rel=5e-5)
    got = SD_NS.sigma_ve(GITS(coeff)(SD_NS, steps)).numpy()
    assert got == pytest.approx(COMFY_GITS[key][:-1], rel=5e-5)


def test_gits_table_shape_and_interpolation():
    assert tuple(GITS_TABLE) == GITS_COEFFS == tuple(round(0.8 + 0.05 * i, 2) for i in range(15))
    for coeff, rows in GITS_TABLE.items():
        assert [len(r) for r in rows] == list(range(1, 20)), coeff
        assert all(all(0 < a < b < 100 for a, b in zip(r, r[1:])) or len(r) == 1 for r in rows)
    # Beyond 20 steps: the 20-step list log-linearly resampled (ComfyUI); both ends kept.
    s = GITS(1.2).sigmas(39)  # 21 -> 40 points is not a refinement; check the ends and monotonicity
    assert s[0] == pytest.approx(gits_sigmas_sd15(1.2, 20)[0]) and bool((np.diff(s) < 0).all())
    s = GITS(1.2).sigmas(40)  # 21 -> 41 points keeps every table value at even positions
    assert np.allclose(s[::2], gits_sigmas_sd15(1.2, 20)[:20], rtol=1e-12)


# ---- explicit lists -------------------------------------------------------------------------------
def test_sigmas_spec_from_the_cli_syntax():
    sched = STEP_SCHEDULES.create("sigmas:values=[14.6,6.0,2.0,0.5,0]")
    ns = VE(0.002, 80.0)
    assert sched(ns, 4).tolist() == pytest.approx([14.6, 6.0, 2.0, 0.5], rel=1e-12)
    grid = Sampler(SOLVERS.create("unipc_bh2"), sched, 4).grid(ns)
    assert grid.sigma_list == pytest.approx([14.6, 6.0, 2.0, 0.5, 0.0])
    last = Sampler(SOLVERS.create("euler"), sched, 3, final="last").grid(ns)
    assert last.sigma_list == pytest.approx([14.6, 6.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="sigmas list has 4 points, cannot produce 20; run it with steps=4"):
        Sampler(SOLVERS.create("euler"), sched, 20).grid(ns)


def test_sigmas_are_flow_times_on_rectified_flow_and_ve_sigmas_elsewhere():
    assert Sigmas([1.0, 0.6, 0.2])(RectifiedFlow(), 3).tolist() == [1.0, 0.6, 0.2]
    t = Sigmas("[14.6, 2.0, 0.1]")(SD_NS, 3)
    assert SD_NS.sigma_ve(t).tolist() == pytest.approx([14.6, 2.0, 0.1], rel=1e-9)


def test_timesteps_spec_runs_every_solver_family():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    ays = AysSchedules["StableDiffusionTimesteps"]
    spec = "timesteps:values=[" + ",".join(str(v) for v in ays) + "]"
    for solver in ("euler", "heun", "dpmpp_2m", "unipc_bh2"):
        grid = Sampler(SOLVERS.create(solver), STEP_SCHEDULES.create(spec), 10).grid(SD_NS)
        assert list(grid.t_list[:10]) == [float(v) for v in ays]


@pytest.mark.parametrize("spec, message", [
    ("sigmas", "needs option 'values'"),
    ("sigmas:values=[]", "values is empty"),
    ("sigmas:values=[1,2,0]", "strictly decreasing"),
    ("sigmas:values=[3,0,-1]", "> 0 except a final 0"),
    ("sigmas:values=[3,abc]", "must be numbers, got 'abc'"),
    ("sigmas:values=[3,inf]", "finite"),
    ("timesteps:values=[500,700]", "strictly decreasing"),
    ("gits:coeff=0.83", "coeff must be one of 0.80, 0.85"),
    ("align_your_steps:model=sd3", "must be one of sd15, sdxl, svd"),
    ("beta:alpha=0", "alpha and beta must be > 0"),
    ("laplace:beta=0", "beta must be > 0"),
    ("linear_quadratic:threshold_noise=0.7", r"threshold_noise must be in \(0, 0.5\)"),
    ("vp:eps_s=1.5", r"eps_s must be in \(0, 1\)"),
])
def test_bad_options_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        STEP_SCHEDULES.create(spec)


def test_bad_calls_are_one_line_errors():
    with pytest.raises(ValueError, match="leave the noise schedule's range"):
        STEP_SCHEDULES.create("timesteps:values=[1200,500]")(SD_NS, 2)
    with pytest.raises(ValueError, match=r"linear_steps must be in \[1, 3\]"):
        LinearQuadratic(linear_steps=4)(RectifiedFlow(), 4)
    with pytest.raises(ValueError, match="svd.*clipped points coincide"):
        AlignYourSteps("svd")(SD_NS, 10)  # SVD's sigmas reach 700; SD stops at 14.6


# ---- every new name on every process, and the CLI --------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_every_new_schedule_any_step_count(name):
    for ns in (LinearVP(), VE(), RectifiedFlow(), SD_NS, DiscreteVP.from_config({})):
        for steps in (1, 2, 5, 21, 40):
            for final in ("zero", "last"):
                grid = Sampler(SOLVERS.create("euler"), STEP_SCHEDULES.create(name), steps, final=final).grid(ns)
                assert grid.steps == steps and (grid.lambda_[1:] > grid.lambda_[:-1]).all()


def test_cli_generate_with_a_sigma_list(tmp_path):
    from diffsample.cli.main import main

    args = ["generate", "--num-samples", "2", "-q", "--solver", "uni_pc_bh2"]
    ok = CliRunner().invoke(main, [*args, "--steps", "3", "--schedule", "sigmas:values=[14.6,2.0,0.3,0]",
                                   "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, [*args, "--steps", "5", "--schedule", "sigmas:values=[14.6,2.0,0.3,0]",
                                    "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "sigmas list has 3 points, cannot produce 5" in bad.output
    assert not (tmp_path / "b").exists()
