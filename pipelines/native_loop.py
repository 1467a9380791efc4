"""The native loop over a diffusers pipeline ("we drive"): encode with the pipeline, sample with
our :class:`~diffsample.samplers.sampler.Sampler`, decode with the pipeline.

Guidance nesting (the same on every path -- ``sample_pipeline``, ``diffsample generate --model
FOLDER``, ``attach``)::

    model -> CFG (the pipeline's cfg_scale, or ONE CFG-family term) -> the other terms, in order

The CFG step is either the pipeline's classifier-free guidance at ``cfg_scale`` (``None``: the
pipeline's default; applied when > 1, as the pipelines do) or one CFG-family term (``cfg``,
``cfg_rescale``, ``apg``, ``cfg_zero_star``, ``cfgpp``), which *replaces* it: the default scale is
not applied under it, and an explicit ``cfg_scale`` with it is refused (give the scale in the term,
``cfg_rescale:scale=7.5``). Text-to-image pipelines are conditional (their negative / empty-prompt
branch is the unconditional one), so the CFG family is built for them
(:func:`~diffsample.pipelines.resources.pipeline_resources`). Under ``attach`` a CFG-family term works
on the two branches of the pipeline's own CFG calls (docs/design.md#composition).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsample.core.spec import Spec
from diffsample.guidance.composition import compose
from diffsample.guidance.loop_hooks import collect_hooks
from diffsample.samplers.sampler import SampleResult, Sampler
from diffsample.samplers.stochastic_variant import switch_for_noise_terms
from diffsample.solvers import SOLVERS, STEP_SCHEDULES
from diffsample.solvers.model_time import WithModelTimes
from diffsample.solvers.solver import NoiseFn, Solver

from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser
from diffsample.pipelines.process import PipelineGrid, grid_from_schedule, grid_from_scheduler
from diffsample.pipelines.resources import build_terms, native_cfg_scale


@dataclass(frozen=True)
class PipelineSample:
    """Output of :func:`sample_pipeline`.

    Attributes:
        images: ``(B, 3, H, W)`` float32 in [0, 1] on the CPU, or ``None`` with ``output_type="latent"``.
        latents: final latents ``(B, ...)`` in the pipeline's latent layout (packed for FLUX).
        result: the run's :class:`SampleResult` (``nfe``, ``model_evals``, grid, wall time).
        grid: where the network was evaluated, and the scheduler timesteps of those points.
        cfg_scale: the classifier-free guidance scale applied below the guidance terms, ``None``
            when none was (scale <= 1, or a CFG-family term in its place).
        solver: the solver spec that ran (a noise-acting term may have switched a deterministic
            spec to its ``eta=1`` variant); ``None`` when a solver object was given.
    """

    images: Tensor | None
    latents: Tensor
    result: SampleResult
    grid: PipelineGrid
    cfg_scale: float | None = None
    solver: str | None = None


def guided_denoiser(denoiser: PipelineDenoiser, cfg_scale: float | None = None, guidance: Sequence[Any] = (),
                    *, sampler: Any = None):
    """``denoiser`` in the module's nesting order: CFG at ``cfg_scale`` (``None``: the adapter's
    ``default_cfg_scale``; applied when > 1) or one CFG-family term in its place, then the other
    ``guidance`` terms in order (objects, or registry specs built with the pipeline's resources;
    ``sampler`` goes to terms that need the grid, CFG++).

    Raises:
        ValueError: unknown guidance, a CFG-family term with an explicit ``cfg_scale`` or with
            another one, a term that evaluates the model's branches itself above CFG, or the CFG
            family on an unconditional pipeline.
    """
    return _guided(denoiser, cfg_scale, guidance, sampler)[0]


def _guided(denoiser: Any, cfg_scale: float | None, guidance: Sequence[Any], sampler: Any) -> tuple[Any, float | None]:
    """``(guided denoiser, the CFG scale applied below the terms or None)``."""
    terms, labels = build_terms(denoiser, guidance, sampler)
    scale = native_cfg_scale(terms, labels, cfg_scale, getattr(denoiser, "default_cfg_scale", None))
    return compose(denoiser, terms, scale, labels), scale


def sample_pipeline(pipe: Any, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                    *, solver: str | Solver = "dpmpp_2m", schedule: str | Callable | None = None, steps: int = 20,
                    cfg_scale: float | None = None, guidance: Sequence[Any] = (), num_images_per_prompt: int = 1,
                    height: int | None = None, width: int | None = None, generator: Any = None,
                    noise: Tensor | None = None, noise_fn: NoiseFn | None = None,
                    chain_noise: Callable[[int], tuple[Tensor, NoiseFn | None]] | None = None, output_type: str = "pt",
                    denoiser: PipelineDenoiser | None = None, stop: Any = None, stop_return: str = "noisy",
                    **encode_kwargs: Any) -> PipelineSample:
    """Sample from ``pipe`` with our loop (any solver, guidance term, exact ``nfe`` / ``model_evals``).

    Args:
        pipe: a supported pipeline (DDPM, SD 1.x/2.x, SDXL, SD3, FLUX, PixArt-alpha/Sigma).
        prompt, negative_prompt: text (text-to-image pipelines); ``None`` for DDPMPipeline.
        solver: ``SOLVERS`` spec or a solver object.
        schedule: ``None`` -- the grid the pipeline's scheduler would use for ``steps`` (same
            timesteps as the pipeline's own run); else a ``STEP_SCHEDULES`` spec or callable.
        steps: grid intervals.
        cfg_scale: classifier-free guidance scale (applied when > 1); ``None``: the pipeline's
            default (SD 7.5, SDXL 5, SD3 7, PixArt 4.5, FLUX true CFG 1 = off), dropped under a
            CFG-family term.
        guidance: guidance terms (objects or specs such as ``"cfg_rescale:scale=7.5,phi=0.7"``),
            nested as the module docstring says: a CFG-family term replaces the pipeline's CFG,
            the others wrap the CFG-guided denoiser in order.
        num_images_per_prompt, height, width: as the pipeline takes them.
        generator: drawn from as the pipeline draws its initial latents (``prepare_latents``), so
            a seed gives the same initial noise as ``pipe(..., generator=...)``.
        noise: explicit initial latents ``(B, ...)`` instead (e.g. per-sample seeded noise).
        noise_fn: noise of stochastic solvers (default: ``torch.randn_like``). A term acting on
            that noise (NoiseTilt, SVDD) switches a deterministic ``solver`` spec to its ``eta=1``
            variant, with a :class:`~diffsample.samplers.stochastic_variant.SolverSwitched` warning.
        chain_noise: ``k -> (noise, noise_fn)`` of chain / particle ``k >= 1`` for best-of-N and
            twisted SMC (default: fresh ``torch.randn`` draws).
        output_type: ``"pt"`` (decoded images) or ``"latent"``.
        denoiser: a prebuilt adapter (default ``PipelineDenoiser.from_pipeline(pipe)``).
        stop, stop_return: a :class:`~diffsample.solvers.stop_time.StopTime`: the grid is cut at the
            stop (truncated sampling, arXiv 2606.13796) and the latent ``stop_return`` names
            (``noisy``, ``denoised``, ``rescaled``, ``ou``) is returned and decoded. Without a stop
            the run ends with the pipeline's usual step to ``sigma = 0``, a Tweedie-type output,
            not the truncated state.
        **encode_kwargs: passed to the family's ``encode`` (FLUX ``guidance_scale``,
            ``max_sequence_length``).

    Raises:
        ValueError: unsupported pipeline, unknown solver / schedule / guidance, bad ``output_type``,
            a prompt for an unconditional pipeline, ``noise`` with the wrong batch size, an explicit
            ``cfg_scale`` with a CFG-family term (or a nesting :func:`guided_denoiser` refuses).
    """
    if output_type not in ("pt", "latent"):
        raise ValueError(f"unknown output_type {output_type!r}; valid: pt, latent")
    den = denoiser or PipelineDenoiser.from_pipeline(pipe)
    spec = Spec.parse(solver) if isinstance(solver, (str, Spec)) else None
    solver_obj = SOLVERS.create(str(spec)) if spec is not None else solver
    if den.text_conditioned:
        cond = den.encode(prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                          **({"height": height, "width": width} if "height" in _params(den.encode) else {}),
                          **encode_kwargs)
    else:
        cond = den.encode(prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt)
    batch = den.batch_size(prompt, num_images_per_prompt)
    # The pipeline's own draw (also sets per-size state such as FLUX's img_ids).
    drawn = den.prepare_noise(batch, generator if noise is None else torch.Generator().manual_seed(0), height, width)
    init = drawn
    if noise is not None:
        if noise.shape != drawn.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(drawn.shape)}")
        init = noise.to(device=drawn.device, dtype=drawn.dtype)
    t_model = None
    if schedule is None:
        pg = grid_from_scheduler(pipe.scheduler, den.process, steps, **den.scheduler_kwargs(steps, init, height, width))
    else:
        step_schedule = STEP_SCHEDULES.create(schedule) if isinstance(schedule, str) else schedule
        pg = grid_from_schedule(step_schedule, den.process, steps)
        t_model = getattr(step_schedule, "t_model", None)
    step_schedule, final = pg.step_schedule()
    if t_model:  # an LD3 schedule with decoupled model times: they follow its grid into the fixed copy
        step_schedule = WithModelTimes(step_schedule, tuple(pg.t.tolist()), tuple(t_model))
    sampler = Sampler(solver_obj, step_schedule, pg.steps, final=final, stop=stop, stop_return=stop_return)
    guided, applied = _guided(den, cfg_scale, guidance, sampler)
    if spec is not None:
        switched = switch_for_noise_terms(spec, collect_hooks(guided))
        if switched != spec:
            spec = switched
            sampler = Sampler(SOLVERS.create(str(spec)), step_schedule, pg.steps, final=final, stop=stop,
                              stop_return=stop_return)
            guided, applied = _guided(den, cfg_scale, guidance, sampler)
    result = sampler(guided, init, cond if den.text_conditioned else None, noise_fn=noise_fn, chain_noise=chain_noise)
    latents = result.x
    images = None
    if output_type == "pt":
        with torch.no_grad():
            images = den.decode(latents.to(den.model_dtype or latents.dtype), height, width)
    return PipelineSample(images, latents, result, pg, applied, None if spec is None else str(spec))


def _params(fn: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
