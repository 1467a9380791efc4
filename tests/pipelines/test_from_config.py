"""``DiffSampleScheduler.from_config`` maps diffusers' scheduler flags: the shim's grid (network
timesteps and sigmas) equals the grid diffusers' own scheduler builds for the same flag, on the tiny
pipelines' scheduler configs; unknown or contradictory keywords are refused with one line."""

import copy
import functools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffsample import attach, detach  # noqa: E402
from diffsample.pipelines.scheduler_shim import DiffSampleScheduler, solver_from_flags  # noqa: E402
from diffsample.testbed import tiny_pipelines as tp  # noqa: E402

STEPS = 10
VP_FLAGS = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
            dict(use_lu_lambdas=True), dict(final_sigmas_type="sigma_min")]
SPACING_FLAGS = [dict(timestep_spacing=s) for s in ("linspace", "leading", "trailing")]
FLOW_FLAGS = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
              dict(shift=2.0), dict(flow_shift=2.0)]


@functools.lru_cache(maxsize=None)
def _pipe(family):
    return tp.build(family)


def config_of(family):
    return dict(_pipe(family).scheduler.config)


def grid(scheduler, **kwargs):
    scheduler.set_timesteps(STEPS, **kwargs)
    return scheduler.timesteps.clone(), scheduler.sigmas.clone()


# ---- grid flags vs diffusers' own schedulers ---------------------------------------------------------
@pytest.mark.parametrize("flag", VP_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("family", ["sd", "sd2"])
def test_vp_flag_on_a_ddim_config_gives_dpm_solvers_grid(family, flag):
    """DDIMScheduler has no such flag: the grid is DPMSolverMultistepScheduler.from_config(config, flag)'s."""
    config = config_of(family)
    shim = DiffSampleScheduler.from_config(config, solver="dpmpp_2m", **flag)
    assert shim.base_scheduler_name == "DPMSolverMultistepScheduler"
    ts, sigmas = grid(shim)
    ref_ts, ref_sigmas = grid(diffusers.DPMSolverMultistepScheduler.from_config(config, **flag))
    plain_ts, _ = grid(diffusers.DPMSolverMultistepScheduler.from_config(config))
    assert torch.equal(ts, ref_ts)
    torch.testing.assert_close(sigmas, ref_sigmas, rtol=1e-5, atol=1e-6)
    if "final_sigmas_type" not in flag:
        assert not torch.equal(ref_ts, plain_ts)  # the flag changes the grid


@pytest.mark.parametrize("flag", VP_FLAGS[:3] + SPACING_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_vp_flag_on_an_euler_config_keeps_euler(flag):
    """SDXL's EulerDiscreteScheduler takes these flags: its own grid (float timesteps) is used."""
    config = config_of("sdxl")
    shim = DiffSampleScheduler.from_config(config, solver="dpmpp_2m", **flag)
    assert shim.base_scheduler_name == "EulerDiscreteScheduler"
    ts, sigmas = grid(shim)
    ref_ts, ref_sigmas = grid(diffusers.EulerDiscreteScheduler.from_config(config, **flag))
    assert torch.equal(ts, ref_ts)
    torch.testing.assert_close(sigmas, ref_sigmas, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flag", SPACING_FLAGS, ids=lambda f: f["timestep_spacing"])
def test_timestep_spacing_on_a_ddim_config(flag):
    config = config_of("sd")
    shim = DiffSampleScheduler.from_config(config, **flag)
    assert shim.base_scheduler_name == "DDIMScheduler"
    ref = diffusers.DDIMScheduler.from_config(config, **flag)
    ref.set_timesteps(STEPS)
    shim.set_timesteps(STEPS)
    assert torch.equal(shim.timesteps, ref.timesteps)
    ac = ref.alphas_cumprod[ref.timesteps].double()
    torch.testing.assert_close(shim.sigmas[:-1].double(), ((1 - ac) / ac).sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("flag", FLOW_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_flags_match_flow_match_euler(family, flag):
    config = config_of(family)
    shim = DiffSampleScheduler.from_config(config, solver="dpmpp_2m", **flag)
    assert shim.base_scheduler_name == "FlowMatchEulerDiscreteScheduler"
    mu = {"mu": 0.8} if config.get("use_dynamic_shifting") else {}
    ts, sigmas = grid(shim, **mu)
    theirs = {("shift" if k == "flow_shift" else k): v for k, v in flag.items()}
    ref_ts, ref_sigmas = grid(diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, **theirs), **mu)
    _, plain = grid(diffusers.FlowMatchEulerDiscreteScheduler.from_config(config), **mu)
    torch.testing.assert_close(ts, ref_ts, rtol=0, atol=1e-3)
    torch.testing.assert_close(sigmas, ref_sigmas, rtol=0, atol=1e-5)  # t = 1 starts 1e-6 below
    if not (family == "flux" and "use" not in next(iter(flag))):  # FLUX's mu replaces the static shift
        assert (ref_sigmas - plain).abs().max() > 1e-3


@pytest.mark.parametrize("flag", [dict(use_karras_sigmas=True), dict(use_lu_lambdas=True, solver_order=3)],
                         ids=["karras", "lu-3m"])
def test_flags_inside_a_saved_dpm_config_apply(flag):
    """A DPMSolverMultistepScheduler config carrying the flag (no keyword given): same grid, and
    the solver its own settings name."""
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config_of("sd"), **flag)
    shim = DiffSampleScheduler.from_config(ref.config)
    assert shim.base_scheduler_name == "DPMSolverMultistepScheduler"
    assert shim.config.solver == ("dpmpp_3m" if flag.get("solver_order") == 3 else "dpmpp_2m")
    ts, sigmas = grid(shim)
    ref_ts, ref_sigmas = grid(ref)
    assert torch.equal(ts, ref_ts)
    torch.testing.assert_close(sigmas, ref_sigmas, rtol=1e-5, atol=1e-6)


def test_karras_shim_reproduces_diffusers_pipeline_run():
    """The whole SD run: our dpmpp_2m on the flagged grid == diffusers' DPM-Solver++(2M) with Karras
    sigmas, both as a plain ``pipe.scheduler`` and through ``attach`` (grid read from its sigmas)."""
    pipe = copy.copy(_pipe("sd"))
    kw = tp.call_kwargs("sd", steps=6, batch=2)

    def run():
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).images.float()

    original = pipe.scheduler
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(original.config, use_karras_sigmas=True)
    ref = run()
    attach(pipe, "dpmpp_2m")
    attached = run()
    detach(pipe)
    pipe.scheduler = DiffSampleScheduler.from_config(original.config, solver="dpmpp_2m", use_karras_sigmas=True)
    alone = run()
    pipe.scheduler = DiffSampleScheduler.from_config(original.config, solver="dpmpp_2m")
    plain = run()
    pipe.scheduler = original
    for ours in (attached, alone):
        assert float((ours - ref).norm() / ref.norm()) <= 1e-4
    assert float((plain - ref).norm() / ref.norm()) > 1e-2


# ---- solver flags -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, solver", [
    (dict(algorithm_type="dpmsolver++"), "dpmpp_2m"),
    (dict(algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"),
    (dict(solver_order=3), "dpmpp_3m"),
    (dict(solver_order=3, algorithm_type="sde-dpmsolver++"), "dpmpp_3m_sde"),
    (dict(solver_type="heun"), "dpmpp_2m:solver_type=heun"),
    (dict(solver_order=1), "dpmpp_2m:order=1"),
])
def test_solver_flags_name_the_solver(flags, solver):
    shim = DiffSampleScheduler.from_config(config_of("sd"), **flags)
    assert shim.config.solver == solver == solver_from_flags(**flags)
    shim.solver  # builds  # noqa: B018


def test_heun_solver_type_matches_diffusers_heun_update():
    """solver_type=heun reaches our solver: its 2M run equals diffusers' on the same grid."""
    pipe = copy.copy(_pipe("sd"))
    kw = tp.call_kwargs("sd", steps=5, batch=1)
    original = pipe.scheduler
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(original.config, solver_type="heun")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images.float()
    pipe.scheduler = DiffSampleScheduler.from_config(original.config, solver_type="heun",
                                                     base_scheduler="DPMSolverMultistepScheduler")
    ours = pipe(**kw, generator=torch.Generator().manual_seed(0)).images.float()
    pipe.scheduler = original
    assert float((ours - ref).norm() / ref.norm()) <= 1e-4


def test_prediction_type_keyword_reaches_the_process():
    shim = DiffSampleScheduler.from_config(config_of("sd"), prediction_type="v_prediction")
    assert shim.process.prediction_type == "v_prediction"


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(use_karas_sigmas=True), r"unknown keyword 'use_karas_sigmas'.*did you mean 'use_karras_sigmas'.*accepted: solver"),
    (dict(thresholding=True), r"unknown keyword 'thresholding'.*accepted: .*use_karras_sigmas"),
    (dict(algorithm_type="dpmsolver"), r"algorithm_type='dpmsolver' is not supported; valid: dpmsolver\+\+, sde-dpmsolver\+\+"),
    (dict(solver_order=4), r"solver_order=4 is not supported; valid: 1, 2, 3"),
    (dict(solver_type="bh2"), r"solver_type='bh2' is not supported; valid: midpoint, heun"),
    (dict(solver="unipc_bh2", solver_order=3), r"solver='unipc_bh2' and solver_order=3 .* disagree"),
    (dict(use_karras_sigmas=True, use_beta_sigmas=True), r"use_karras_sigmas and use_beta_sigmas .* choose one"),
    (dict(use_karras_sigmas="yes"), r"use_karras_sigmas must be True or False"),
    (dict(timestep_spacing="uniform"), r"timestep_spacing='uniform' is not supported; valid: linspace, leading, trailing"),
    (dict(final_sigmas_type="denoise_to_zero"), r"final_sigmas_type='denoise_to_zero' is not supported; valid: zero, sigma_min"),
    (dict(flow_shift=3.0), r"flow_shift=3.0 applies to rectified-flow models; this config is a discrete-VP"),
    (dict(prediction_type="x0"), r"prediction_type='x0' is not supported; valid: epsilon, v_prediction"),
])
def test_bad_keywords_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        DiffSampleScheduler.from_config(config_of("sd"), **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flag", ["use_lu_lambdas", "timestep_spacing", "final_sigmas_type"])
def test_flow_config_refuses_vp_only_flags(flag):
    value = {"use_lu_lambdas": True, "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}[flag]
    with pytest.raises(ValueError, match=rf"{flag} does not apply to rectified-flow schedulers.*valid here: use_karras_sigmas"):
        DiffSampleScheduler.from_config(config_of("sd3"), **{flag: value})


def test_save_load_keeps_the_flags(tmp_path):
    shim = DiffSampleScheduler.from_config(config_of("sd"), use_karras_sigmas=True, solver_order=3)
    shim.save_pretrained(tmp_path)
    loaded = DiffSampleScheduler.from_pretrained(tmp_path)
    assert loaded.base_scheduler_name == "DPMSolverMultistepScheduler" and loaded.config.solver == "dpmpp_3m"
    assert torch.equal(grid(loaded)[0], grid(shim)[0])
