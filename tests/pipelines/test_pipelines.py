"""Both front-ends over diffusers pipelines (issue 7), on tiny random pipelines built offline.

(a) ``attach`` with our dpmpp_2m / unipc_bh2 reproduces the pipeline run with diffusers' own
DPMSolverMultistepScheduler / UniPCMultistepScheduler on identical timesteps; (b) the native loop
and ``attach`` give the same samples for the same seed; (c) a Stein solver and a gradient guidance
term run through both front-ends and agree; (d) fp16 / bf16; (e) model-offload hooks; plus the
standalone shim, save/load round trip, nfe / model_evals and bad input.
"""

import copy
import functools

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffsample import attach, detach  # noqa: E402
from diffsample.guidance import ClassifierGuidance  # noqa: E402
from diffsample.pipelines.capture import ReplayError  # noqa: E402
from diffsample.pipelines import PipelineDenoiser, sample_pipeline  # noqa: E402
from diffsample.pipelines.scheduler_shim import DiffSampleScheduler  # noqa: E402
from diffsample.testbed import tiny_pipelines as tp  # noqa: E402

FAMILIES = ["ddpm", "ddpm_gmm", "ddpm_mnist", "sd", "sd2", "sdxl", "sd3", "flux", "pixart"]
TEXT = [f for f in FAMILIES if not f.startswith("ddpm")]
STEPS, BATCH = 4, 2
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _pipe(family):
    return tp.build(family)


def pipe_for(family):
    """A cached tiny pipeline with its original scheduler restored."""
    pipe = _pipe(family)
    if isinstance(pipe.scheduler, DiffSampleScheduler):
        detach(pipe)
    return pipe


def run(pipe, family, **overrides):
    """The pipeline's own loop; DDPM returns decoded images (B, H, W, C), the others latents."""
    kw = tp.call_kwargs(family, steps=STEPS, batch=BATCH)
    kw.update(overrides)
    return torch.as_tensor(pipe(**kw, generator=torch.Generator().manual_seed(0)).images).float()


def native(pipe, family, solver, guidance=(), cfg_scale="pipeline", **kw):
    call = tp.call_kwargs(family, steps=STEPS, batch=BATCH)
    extra = {k: call[k] for k in ("max_sequence_length",) if k in call}
    if family == "flux":
        extra["guidance_scale"] = call["guidance_scale"]
    scale = (None if family == "flux" else call.get("guidance_scale")) if cfg_scale == "pipeline" else cfg_scale
    out = sample_pipeline(pipe, call.get("prompt"), solver=solver, guidance=guidance, steps=STEPS,
                          num_images_per_prompt=BATCH, cfg_scale=scale, height=16, width=16,
                          generator=torch.Generator().manual_seed(0),
                          output_type="pt" if family.startswith("ddpm") else "latent", **extra, **kw)
    x = out.images.permute(0, 2, 3, 1) if family.startswith("ddpm") else out.latents
    return x.float(), out


def rel(a, b):
    return float((a - b).norm() / b.norm())


class _DDPMCompatible:
    """DDPMPipeline passes ``generator`` to ``step``; UniPC's ``step`` does not take it."""

    def step(self, *args, generator=None, **kwargs):
        return super().step(*args, **kwargs)


def reference_scheduler(pipe, solver):
    """diffusers' own multistep scheduler for ``solver``, configured from the pipeline's."""
    config = dict(pipe.scheduler.config)
    extra = {}
    if "FlowMatch" in type(pipe.scheduler).__name__:
        extra = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config.get("shift", 1.0))
    if solver == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, solver_order=2, algorithm_type="dpmsolver++",
                                                                **extra)
    cls = type("UniPC", (_DDPMCompatible, diffusers.UniPCMultistepScheduler), {})
    return cls.from_config(config, solver_order=2, solver_type="bh2", **extra)


# ---- (a) attach reproduces diffusers' own schedulers ---------------------------------------------
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc_bh2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attach_matches_diffusers_scheduler(family, solver):
    pipe = copy.copy(pipe_for(family))  # shallow: shares the networks, own scheduler slot
    pipe.scheduler = reference_scheduler(pipe, solver)
    ref = run(pipe, family)
    ref_timesteps = pipe.scheduler.timesteps.clone()
    shim = attach(pipe, solver)  # grid read from the reference scheduler: identical timesteps
    ours = run(pipe, family)
    timesteps = shim.timesteps.clone()
    assert shim.report()["nfe"] == STEPS
    detach(pipe)
    assert torch.equal(timesteps, ref_timesteps)
    assert rel(ours, ref) <= TOL, f"{family} {solver}: relative difference {rel(ours, ref):.2e}"


def test_own_step_schedules_reproduce_diffusers_timesteps():
    """Our ``trailing`` schedule gives diffusers' DPM-Solver grid and timesteps (VP)."""
    from diffsample.pipelines import grid_from_schedule, grid_from_scheduler, process_from_config
    from diffsample.solvers import STEP_SCHEDULES

    vp = diffusers.DPMSolverMultistepScheduler(**{k: v for k, v in tp.SD_SCHEDULER.items() if k != "clip_sample"
                                                  and k != "set_alpha_to_one"}, timestep_spacing="trailing")
    process = process_from_config(vp.config, "DPMSolverMultistepScheduler")
    ours = grid_from_schedule(STEP_SCHEDULES.create("trailing"), process, 7)
    theirs = grid_from_scheduler(vp, process, 7)
    assert torch.equal(ours.t, theirs.t) and torch.equal(ours.timesteps, theirs.timesteps)


# ---- (b) native loop == attach ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_native_loop_matches_attach(family):
    pipe = pipe_for(family)
    shim = attach(pipe, "dpmpp_2m")
    ours = run(pipe, family)
    report = shim.report()
    detach(pipe)
    nat, out = native(pipe, family, "dpmpp_2m")
    assert rel(nat, ours) <= TOL, f"{family}: relative difference {rel(nat, ours):.2e}"
    cfg = 2 if family not in ("flux",) and not family.startswith("ddpm") else 1
    assert out.result.nfe == STEPS
    if family != "ddpm_gmm":  # the GMM eps-model counts its own rows too
        assert out.result.model_evals == cfg * STEPS
    assert report == {"nfe": STEPS, "model_evals": cfg * STEPS}  # no replay: one pass per step


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_native_decodes_like_the_pipeline(family):
    pipe = pipe_for(family)
    kw = tp.call_kwargs(family, steps=STEPS, batch=BATCH)
    kw["output_type"] = "pt"
    attach(pipe, "dpmpp_2m")
    images = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    detach(pipe)
    _, out = native(pipe, family, "dpmpp_2m")
    decoded = PipelineDenoiser.from_pipeline(pipe)
    decoded.prepare_noise(BATCH, None, 16, 16)
    assert rel(decoded.decode(out.latents, 16, 16), images.float()) <= TOL


def test_multistage_solver_through_attach_matches_native():
    pipe = pipe_for("sd")
    attach(pipe, "heun")
    ours = run(pipe, "sd")
    report = pipe.scheduler.report()
    detach(pipe)
    nat, out = native(pipe, "sd", "heun")
    assert rel(nat, ours) <= TOL
    assert report["nfe"] == out.result.nfe == 2 * STEPS - 1


# ---- (c) Stein solver and gradient guidance through both front-ends -------------------------------
def _classifier():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_stein_solver_both_front_ends(family):
    pipe = pipe_for(family)
    shim = attach(pipe, "stein-dpm")
    ours = run(pipe, family)
    report = shim.report()
    detach(pipe)
    nat, out = native(pipe, family, "stein-dpm")
    plain, _ = native(pipe, family, "dpmpp_2m")
    assert rel(nat, ours) <= TOL, f"{family}: relative difference {rel(nat, ours):.2e}"
    assert rel(nat, plain) > 1e-3  # the correction did something
    assert report["nfe"] == out.result.nfe == STEPS
    assert report["model_evals"] > STEPS  # probes and the replay are counted


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_guidance_both_front_ends(family):
    """Tweedie classifier guidance (one VJP through the denoiser per call), CFG off on both sides."""
    pipe = pipe_for(family)
    term = ClassifierGuidance(clean_classifier=_classifier(), estimator="tweedie", label=1, scale=2.0,
                              base="conditional")
    no_cfg = {} if family.startswith("ddpm") or family == "flux" else {"guidance_scale": 1.0}
    shim = attach(pipe, "dpmpp_2m", guidance=[term])
    ours = run(pipe, family, **no_cfg)
    report = shim.report()
    detach(pipe)
    nat, out = native(pipe, family, "dpmpp_2m", guidance=[term], cfg_scale=1.0)
    plain, _ = native(pipe, family, "dpmpp_2m", cfg_scale=1.0)
    assert rel(nat, ours) <= TOL, f"{family}: relative difference {rel(nat, ours):.2e}"
    assert rel(nat, plain) > 1e-4
    assert report["nfe"] == out.result.nfe == STEPS
    if family != "ddpm_gmm":
        assert out.result.model_evals == 3 * STEPS  # forward + backward (2)
        assert report["model_evals"] == 4 * STEPS  # + the pipeline's own forward


# ---- (d) dtypes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "pixart"])
def test_half_precision(family, dtype):
    pipe = tp.build(family)
    attach(pipe, "dpmpp_2m")
    ref = run(pipe, family)
    pipe.to(dtype=dtype)
    out_kw = tp.call_kwargs(family, steps=STEPS, batch=BATCH)
    latents = pipe(**out_kw, generator=torch.Generator().manual_seed(0)).images
    assert latents.dtype == dtype and torch.isfinite(latents).all()
    assert pipe.scheduler._x_master.dtype == torch.float32  # fp32 master copy of the state
    assert rel(latents.float(), ref) < 0.1
    detach(pipe)
    nat, out = native(pipe, family, "dpmpp_2m")
    assert torch.isfinite(nat).all() and rel(nat, ref) < 0.1


# ---- (e) offloading hooks ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["attach_first", "offload_first"])
def test_attach_survives_model_cpu_offload(order):
    pipe = tp.build("sd")
    shim = attach(pipe, "stein-dpm")
    ref = run(pipe, "sd")
    detach(pipe)
    if order == "attach_first":
        attach(pipe, "stein-dpm")
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_model_cpu_offload(device="cpu")
        attach(pipe, "stein-dpm")
    for _ in range(2):  # maybe_free_model_hooks re-installs the offload hooks after every call
        out = run(pipe, "sd")
        assert rel(out, ref) <= TOL
        assert pipe.scheduler.report()["model_evals"] > 2 * STEPS  # replays happened
    detach(pipe)


# ---- the shim on its own ----------------------------------------------------------------------------
def test_standalone_shim_and_save_load_round_trip(tmp_path):
    pipe = copy.copy(pipe_for("sd3"))
    attach(pipe, "unipc_bh2")
    ref = run(pipe, "sd3")
    detach(pipe)
    shim = DiffSampleScheduler.from_config(pipe.scheduler.config, solver="unipc_bh2")
    assert shim.base_scheduler_name == "FlowMatchEulerDiscreteScheduler"
    assert shim.config.shift == pipe.scheduler.config.shift
    shim.save_pretrained(tmp_path)
    loaded = DiffSampleScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(shim.config)
    for sched in (shim, loaded):
        pipe.scheduler = sched
        assert rel(run(pipe, "sd3"), ref) <= TOL


def test_standalone_shim_refuses_replay():
    pipe = copy.copy(pipe_for("sd"))
    pipe.scheduler = DiffSampleScheduler.from_config(pipe.scheduler.config, solver="stein-dpm")
    with pytest.raises(ReplayError, match="native loop"):
        run(pipe, "sd")


def test_detach_restores_the_original_scheduler():
    pipe = copy.copy(pipe_for("sd"))
    original = pipe.scheduler
    attach(pipe, "dpmpp_2m")
    assert pipe.config.scheduler[1] == "DiffSampleScheduler"
    assert detach(pipe) is original and pipe.scheduler is original
    assert pipe.config.scheduler[1] == type(original).__name__
    assert not pipe.unet._forward_hooks
    with pytest.raises(ValueError, match="no diffsample scheduler is attached"):
        detach(pipe)


# ---- bad input --------------------------------------------------------------------------------------
def test_attach_needs_scheduler_and_network():
    pipe = copy.copy(pipe_for("sd"))
    pipe.scheduler = None
    with pytest.raises(ValueError, match="has no scheduler"):
        attach(pipe)
    pipe = copy.copy(pipe_for("sd"))
    pipe.unet = None
    with pytest.raises(ValueError, match="'unet' or 'transformer'"):
        attach(pipe)


def test_replay_needed_but_calls_not_capturable():
    pipe = copy.copy(pipe_for("ddpm"))
    unet = pipe.unet
    pipe.unet = lambda *a, **k: unet(*a, **k)  # not an nn.Module: no hooks
    with pytest.raises(ValueError, match="native loop"):
        attach(pipe, "stein-dpm")
    attach(pipe, "dpmpp_2m")  # one evaluation per step needs no capture
    detach(pipe)


def test_replay_refuses_inpainting_style_layout():
    """The network sees the latents concatenated with other channels: replay must refuse."""
    pipe = pipe_for("ddpm")
    shim = attach(pipe, "stein-dpm")
    unet, sched = pipe.unet, pipe.scheduler
    x = torch.randn(2, 3, 8, 8)
    sched.set_timesteps(STEPS)
    wrapped = torch.cat([x, torch.zeros(2, 0, 8, 8)], dim=1) * 1.0001  # not the sample scheduler.step gets
    t = sched.timesteps[0]
    out = unet(wrapped, t).sample
    with pytest.raises(ReplayError, match="native loop"):
        sched.step(out, t, x)
    detach(pipe)
    assert shim._capture is None


def test_unknown_prediction_type_is_named():
    pipe = copy.copy(pipe_for("sd"))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.register_to_config(prediction_type="velocity_x")
    with pytest.raises(ValueError, match="velocity_x"):
        attach(pipe)
    with pytest.raises(ValueError, match="velocity_x"):
        PipelineDenoiser.from_pipeline(pipe)


def test_unsupported_pipeline_for_native_loop():
    class NotAPipeline:
        scheduler = diffusers.DDPMScheduler()

    with pytest.raises(ValueError, match="no native loop for NotAPipeline"):
        PipelineDenoiser.from_pipeline(NotAPipeline())


# ---- decoupled model times (an LD3 schedule fitted with decoupled=True) ------------------------------
def _decoupled_schedule():
    from diffsample.solvers.schedule_file import schedule_from_times

    ns = PipelineDenoiser.from_pipeline(pipe_for("sd")).noise_schedule
    return schedule_from_times([999.0, 700.0, 400.0, 120.0], ns, model="tiny-sd", solver="dpmpp_2m", method="ld3",
                               objective=0.0, t_model=(999.0, 731.5, 377.25, 140.0))


def test_native_loop_hands_the_network_the_decoupled_model_times():
    pipe = pipe_for("sd")
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(float(torch.as_tensor(args[1]).reshape(-1)[0])))
    try:
        out = sample_pipeline(pipe, "a red fox", solver="dpmpp_2m", schedule=_decoupled_schedule(), steps=4,
                              output_type="latent", height=16, width=16)
    finally:
        handle.remove()
    assert out.result.nfe == 4 and torch.isfinite(out.latents).all()
    assert sorted(set(seen), reverse=True) == pytest.approx([999.0, 731.5, 377.25, 140.0], rel=1e-6)


def test_attach_refuses_decoupled_model_times_in_one_line():
    pipe = copy.copy(pipe_for("sd"))
    with pytest.raises(ValueError, match="evaluates the model at decoupled times") as info:
        attach(pipe, "dpmpp_2m", schedule=_decoupled_schedule())
    assert "\n" not in str(info.value) and "native loop" in str(info.value)
    assert not isinstance(pipe.scheduler, DiffSampleScheduler)
