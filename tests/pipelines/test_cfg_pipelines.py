"""The CFG family on text-to-image pipelines (native loop, ``generate --model FOLDER``), its
nesting with the pipeline's own CFG scale, the family through ``attach``, and one ``model_evals`` for
the scheduler shim with and without attach's hooks."""

import copy
import functools
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from diffsample import attach, detach  # noqa: E402
from diffsample.cli.main import main  # noqa: E402
from diffsample.guidance import ClassifierGuidance  # noqa: E402
from diffsample.guidance.term import Cond  # noqa: E402
from diffsample.pipelines import PipelineDenoiser, guided_denoiser, sample_pipeline  # noqa: E402
from diffsample.pipelines.resources import pipeline_resources  # noqa: E402
from diffsample.pipelines.scheduler_shim import DiffSampleScheduler  # noqa: E402
from diffsample.testbed import tiny_pipelines as tp  # noqa: E402

STEPS, BATCH = 4, 2
TEXT = ["sd", "sdxl", "sd3", "flux", "pixart"]


@functools.lru_cache(maxsize=None)
def _pipe(family):
    return tp.build(family)


def native(family, solver="dpmpp_2m", **kw):
    call = tp.call_kwargs(family, steps=STEPS, batch=BATCH)
    extra = {k: call[k] for k in ("max_sequence_length",) if k in call}
    return sample_pipeline(_pipe(family), call["prompt"], solver=solver, steps=STEPS, num_images_per_prompt=BATCH,
                           height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="latent",
                           **extra, **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- the CFG family in the native loop ------------------------------------------------------------------
@pytest.mark.parametrize("family", TEXT)
def test_cfg_term_equals_the_cfg_scale(family):
    """``cfg:scale=s`` replaces the pipeline's default CFG: the same run as ``cfg_scale=s`` (not s on
    top of the default), and ``cfg_rescale`` with phi = 0 is plain CFG."""
    by_scale = native(family, cfg_scale=3.0)
    by_term = native(family, guidance=["cfg:scale=3.0"])
    no_rescale = native(family, guidance=["cfg_rescale:scale=3.0,phi=0.0"])
    default = native(family)
    assert rel(by_term.latents, by_scale.latents) <= 1e-5
    assert rel(no_rescale.latents, by_scale.latents) <= 1e-5
    if family != "flux":  # FLUX's default is CFG off
        assert rel(default.latents, by_scale.latents) > 1e-3  # the default scale was not applied on top
    assert by_term.cfg_scale is None and by_scale.cfg_scale == 3.0
    assert by_term.result.model_evals == by_scale.result.model_evals == 2 * STEPS  # 2B rows per call
    assert by_term.result.nfe == STEPS


def test_cfg_term_equals_an_independent_cfg_computation():
    """At one point: the guided denoiser from ``guidance=["cfg:scale=3"]`` equals
    ``(x - sigma (e_u + 3 (e_c - e_u))) / alpha`` from direct UNet calls on both prompts."""
    pipe = _pipe("sd")
    den = PipelineDenoiser.from_pipeline(pipe)
    cond = den.encode("a red fox", None, num_images_per_prompt=BATCH)
    guided = guided_denoiser(den, None, ["cfg:scale=3.0"])
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.full((BATCH,), 601.0)
    with torch.no_grad():
        ours = guided(x, t, cond)
        e_c = pipe.unet(x, 601, encoder_hidden_states=cond.positive["encoder_hidden_states"]).sample
        e_u = pipe.unet(x, 601, encoder_hidden_states=cond.negative["encoder_hidden_states"]).sample
    abar = pipe.scheduler.alphas_cumprod[601].double()
    eps = (e_u + 3.0 * (e_c - e_u)).double()
    ref = (x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert rel(ours.double(), ref) <= 1e-5


def test_cfg_rescale_matches_the_pipelines_guidance_rescale():
    """Peer check: ``cfg_rescale:scale=5,phi=0.7`` in our loop == StableDiffusionPipeline's own
    ``guidance_scale=5, guidance_rescale=0.7`` (diffusers' rescale_noise_cfg) stepped by attach."""
    pipe = copy.copy(_pipe("sd"))
    kw = tp.call_kwargs("sd", steps=STEPS, batch=BATCH)
    kw.update(guidance_scale=5.0, guidance_rescale=0.7)
    attach(pipe, "dpmpp_2m")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images.float()
    detach(pipe)
    ours = native("sd", guidance=["cfg_rescale:scale=5.0,phi=0.7"]).latents
    plain = native("sd", cfg_scale=5.0).latents
    assert rel(ours, ref) <= 1e-4
    assert rel(plain, ref) > 1e-3  # the rescale did something


@pytest.mark.parametrize("spec", ["apg:scale=5.0", "cfg_zero_star:scale=5.0,space=eps", "cfg_rescale:scale=5.0"])
def test_other_cfg_family_terms_run_on_sd(spec):
    out = native("sd", guidance=[spec])
    plain = native("sd", cfg_scale=5.0)
    assert torch.isfinite(out.latents).all()
    assert rel(out.latents, plain.latents) > 1e-4
    assert out.result.model_evals == 2 * STEPS


def test_cfgpp_runs_with_euler_and_is_refused_with_a_multistep_solver():
    out = native("sd", solver="euler", guidance=["cfgpp:scale=0.5"])
    plain = native("sd", solver="euler", cfg_scale=2.0)
    assert torch.isfinite(out.latents).all() and rel(out.latents, plain.latents) > 1e-4
    with pytest.raises(ValueError, match="CFG\\+\\+ is exact only with the first-order Euler/DDIM solver"):
        native("sd", guidance=["cfgpp"])


# ---- nesting refusals -----------------------------------------------------------------------------------
def test_cfg_scale_with_a_cfg_family_term_is_refused():
    with pytest.raises(ValueError, match=r"--cfg-scale and guidance 'cfg_rescale' both set the CFG scale; give the "
                                         r"scale as cfg_rescale:scale=7\.5"):
        native("sd", cfg_scale=7.5, guidance=["cfg_rescale"])


def test_two_cfg_family_terms_are_refused():
    with pytest.raises(ValueError, match="at most one CFG-family"):
        native("sd", guidance=["cfg", "apg"])


def test_branch_term_over_the_default_cfg_is_refused():
    torch.manual_seed(1)
    term = ClassifierGuidance(clean_classifier=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3)),
                              estimator="tweedie", label=1, base="conditional")
    with pytest.raises(ValueError, match=r"ClassifierGuidance.*cannot wrap the pipeline's default CFG \(scale 7\.5\)"):
        native("sd", guidance=[term])


def test_cfg_family_needs_a_conditional_pipeline():
    pipe = _pipe("ddpm")
    assert pipeline_resources(pipe).conditional is False and pipeline_resources(_pipe("sd")).conditional is True
    with pytest.raises(ValueError, match="needs a conditional model"):
        sample_pipeline(pipe, None, steps=2, guidance=["cfg_rescale"], num_images_per_prompt=1, output_type="latent")


# ---- attach ---------------------------------------------------------------------------------------------
ATTACH_FAMILIES = ["sd", "sdxl", "pixart"]  # eps-prediction VP pipelines; see the note below for SD3 / FLUX


@pytest.mark.parametrize("family", ATTACH_FAMILIES)
@pytest.mark.parametrize("spec,solver", [("cfg:scale=3", "heun"), ("cfg_rescale:scale=3,phi=0.7", "dpmpp_2m"),
                                         ("apg:scale=3", "dpmpp_2m"), ("cfg_zero_star:scale=3,space=eps", "unipc_bh2")])
def test_attach_runs_cfg_family_terms_on_the_pipelines_branches(family, spec, solver):
    """A CFG-family term through attach replaces the pipeline's CFG: it works on the two batch chunks of the
    pipeline's own network calls (the pipeline's guidance_scale only makes it evaluate both) and gives the
    native loop's samples; stateful terms (APG momentum) keep their state over the run."""
    pipe = copy.copy(_pipe(family))
    kw = tp.call_kwargs(family, steps=STEPS, batch=BATCH)
    kw["guidance_scale"] = 5.0  # the pipeline's own scale: replaced by the term's
    attach(pipe, solver, guidance=[spec])
    ours = torch.as_tensor(pipe(**kw, generator=torch.Generator().manual_seed(0)).images).float()
    report = pipe.scheduler.report()
    detach(pipe)
    out = sample_pipeline(pipe, kw["prompt"], solver=solver, guidance=[spec], steps=STEPS, num_images_per_prompt=BATCH,
                          height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert float((ours - out.latents).norm() / out.latents.norm()) <= 1e-5
    assert report["nfe"] == out.result.nfe and report["model_evals"] == out.result.model_evals
    plain = sample_pipeline(pipe, kw["prompt"], solver=solver, steps=STEPS, num_images_per_prompt=BATCH, cfg_scale=5.0,
                            height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert float((ours - plain.latents).norm() / plain.latents.norm()) > 1e-3  # the term, not the pipeline's CFG


def test_attach_cfg_family_term_needs_the_pipelines_two_branches():
    from diffsample.pipelines.capture import ReplayError

    pipe = copy.copy(_pipe("sd"))
    kw = tp.call_kwargs("sd", steps=2, batch=1)
    kw["guidance_scale"] = 1.0  # the pipeline then evaluates the conditional branch only
    attach(pipe, "dpmpp_2m", guidance=["cfg:scale=3"])
    try:
        with pytest.raises(ReplayError, match="needs both branches of the pipeline's CFG.*guidance_scale > 1"):
            pipe(**kw, generator=torch.Generator().manual_seed(0))
    finally:
        detach(pipe)


# ---- generate --model FOLDER -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-cfg")
    tp.build("sd").save_pretrained(folder, safe_serialization=True)
    return folder


def _generate(folder, out, *extra):
    return CliRunner().invoke(main, ["generate", "--model", str(folder), "--prompt", "fox", "--steps", "3",
                                     "--num-samples", "1", "--out", str(out), "-q", *extra])


def test_generate_pipeline_folder_with_cfg_rescale(sd_folder, tmp_path):
    result = _generate(sd_folder, tmp_path / "a", "--guidance", "cfg_rescale")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["guidance"] == ["cfg_rescale"] and record["cfg_scale"] is None  # the term is the CFG step
    assert record["nfe"] == 3 and record["model_evals"] == 6


def test_generate_refuses_cfg_scale_with_a_cfg_family_term(sd_folder, tmp_path):
    result = _generate(sd_folder, tmp_path / "b", "--cfg-scale", "7.5", "--guidance", "cfg_rescale")
    assert result.exit_code == 2
    assert "both set the CFG scale; give the scale as cfg_rescale:scale=7.5" in result.output
    assert not (tmp_path / "b" / "run.json").exists()


# ---- model_evals: the shim alone and under attach ------------------------------------------------------
@pytest.mark.parametrize("family, guidance_scale", [("sd", 5.0), ("sd", 1.0), ("sdxl", 5.0), ("pixart", 5.0)])
def test_shim_alone_reports_attach_model_evals(family, guidance_scale):
    """CFG runs the network on 2B rows while step sees B: without hooks the shim counts the rows
    the pipeline passes through scale_model_input, which equals attach's hook count."""
    pipe = copy.copy(_pipe(family))
    kw = tp.call_kwargs(family, steps=STEPS, batch=BATCH)
    kw["guidance_scale"] = guidance_scale
    original = pipe.scheduler
    shim = attach(pipe, "dpmpp_2m")
    pipe(**kw, generator=torch.Generator().manual_seed(0))
    hooked = shim.report()
    detach(pipe)
    pipe.scheduler = DiffSampleScheduler.from_config(original.config, solver="dpmpp_2m")
    pipe(**kw, generator=torch.Generator().manual_seed(0))
    alone = pipe.scheduler.report()
    pipe.scheduler = original
    cfg = 2 if guidance_scale > 1 else 1
    assert hooked == alone == {"nfe": STEPS, "model_evals": cfg * STEPS}


@pytest.mark.parametrize("family", ["sd3", "ddpm"])
def test_shim_alone_without_scale_model_input_reports_unknown_model_evals(family):
    pipe = copy.copy(_pipe(family))
    original = pipe.scheduler
    pipe.scheduler = DiffSampleScheduler.from_config(original.config, solver="dpmpp_2m")
    pipe(**tp.call_kwargs(family, steps=STEPS, batch=BATCH), generator=torch.Generator().manual_seed(0))
    report = pipe.scheduler.report()
    pipe.scheduler = original
    assert report == {"nfe": STEPS, "model_evals": None}


def test_native_cfg_family_cond_is_the_pipelines_negative_prompt():
    """The negative branch the CFG family uses is the pipeline's negative prompt when given."""
    den = PipelineDenoiser.from_pipeline(_pipe("sd"))
    cond = den.encode("a red fox", "blurry", num_images_per_prompt=1)
    empty = den.encode("a red fox", None, num_images_per_prompt=1)
    assert isinstance(cond, Cond) and not torch.equal(cond.negative["encoder_hidden_states"],
                                                      empty.negative["encoder_hidden_states"])
    a = native("sd", guidance=["cfg_rescale"], negative_prompt="blurry")
    b = native("sd", guidance=["cfg_rescale"])
    assert rel(a.latents, b.latents) > 1e-4
