"""The native loop over a diffusers pipeline ("we drive"): encode with the pipeline, sample with
our :class:`~diffsample.samplers.sampler.Sampler`, decode with the pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsample.guidance import CFG, GUIDANCE, Resources
from diffsample.samplers.sampler import SampleResult, Sampler
from diffsample.solvers import SOLVERS, STEP_SCHEDULES
from diffsample.solvers.solver import NoiseFn, Solver

from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser
from diffsample.pipelines.process import PipelineGrid, grid_from_schedule, grid_from_scheduler


@dataclass(frozen=True)
class PipelineSample:
    """Output of :func:`sample_pipeline`.

    Attributes:
        images: ``(B, 3, H, W)`` float32 in [0, 1] on the CPU, or ``None`` with ``output_type="latent"``.
        latents: final latents ``(B, ...)`` in the pipeline's latent layout (packed for FLUX).
        result: the run's :class:`SampleResult` (``nfe``, ``model_evals``, grid, wall time).
        grid: where the network was evaluated, and the scheduler timesteps of those points.
    """

    images: Tensor | None
    latents: Tensor
    result: SampleResult
    grid: PipelineGrid


def guided_denoiser(denoiser: PipelineDenoiser, cfg_scale: float | None = None, guidance: Sequence[Any] = ()):
    """``denoiser`` with CFG at ``cfg_scale`` (when > 1, as the pipelines do), then the ``guidance``
    terms in order (objects or registry specs) -- the same nesting as :func:`diffsample.attach`,
    where the terms wrap the pipeline's CFG-guided prediction."""
    guided: Any = denoiser
    if cfg_scale is not None and cfg_scale > 1.0:
        guided = CFG(cfg_scale)(guided)
    for term in guidance:
        guided = (GUIDANCE.create(term, resources=Resources()) if isinstance(term, str) else term)(guided)
    return guided


def sample_pipeline(pipe: Any, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                    *, solver: str | Solver = "dpmpp_2m", schedule: str | Callable | None = None, steps: int = 20,
                    cfg_scale: float | None = None, guidance: Sequence[Any] = (), num_images_per_prompt: int = 1,
                    height: int | None = None, width: int | None = None, generator: Any = None,
                    noise: Tensor | None = None, noise_fn: NoiseFn | None = None, output_type: str = "pt",
                    denoiser: PipelineDenoiser | None = None, **encode_kwargs: Any) -> PipelineSample:
    """Sample from ``pipe`` with our loop (any solver, guidance term, exact ``nfe`` / ``model_evals``).

    Args:
        pipe: a supported pipeline (DDPM, SD 1.x/2.x, SDXL, SD3, FLUX, PixArt-alpha/Sigma).
        prompt, negative_prompt: text (text-to-image pipelines); ``None`` for DDPMPipeline.
        solver: ``SOLVERS`` spec or a solver object.
        schedule: ``None`` -- the grid the pipeline's scheduler would use for ``steps`` (same
            timesteps as the pipeline's own run); else a ``STEP_SCHEDULES`` spec or callable.
        steps: grid intervals.
        cfg_scale: classifier-free guidance scale (applied when > 1); ``None``: the pipeline's
            default (SD 7.5, SDXL 5, SD3 7, PixArt 4.5, FLUX true CFG 1 = off).
        guidance: guidance terms wrapping the CFG-guided denoiser.
        num_images_per_prompt, height, width: as the pipeline takes them.
        generator: drawn from as the pipeline draws its initial latents (``prepare_latents``), so
            a seed gives the same initial noise as ``pipe(..., generator=...)``.
        noise: explicit initial latents ``(B, ...)`` instead (e.g. per-sample seeded noise).
        noise_fn: noise of stochastic solvers (default: ``torch.randn_like``).
        output_type: ``"pt"`` (decoded images) or ``"latent"``.
        denoiser: a prebuilt adapter (default ``PipelineDenoiser.from_pipeline(pipe)``).
        **encode_kwargs: passed to the family's ``encode`` (FLUX ``guidance_scale``,
            ``max_sequence_length``).

    Raises:
        ValueError: unsupported pipeline, unknown solver / schedule / guidance, bad ``output_type``,
            a prompt for an unconditional pipeline, ``noise`` with the wrong batch size.
    """
    if output_type not in ("pt", "latent"):
        raise ValueError(f"unknown output_type {output_type!r}; valid: pt, latent")
    den = denoiser or PipelineDenoiser.from_pipeline(pipe)
    solver_obj = SOLVERS.create(solver) if isinstance(solver, str) else solver
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
    if schedule is None:
        pg = grid_from_scheduler(pipe.scheduler, den.process, steps, **den.scheduler_kwargs(steps, init, height, width))
    else:
        step_schedule = STEP_SCHEDULES.create(schedule) if isinstance(schedule, str) else schedule
        pg = grid_from_schedule(step_schedule, den.process, steps)
    step_schedule, final = pg.step_schedule()
    sampler = Sampler(solver_obj, step_schedule, pg.steps, final=final)
    scale = den.default_cfg_scale if cfg_scale is None else cfg_scale
    guided = guided_denoiser(den, scale, guidance)
    result = sampler(guided, init, cond if den.text_conditioned else None, noise_fn=noise_fn)
    latents = result.x
    images = None
    if output_type == "pt":
        with torch.no_grad():
            images = den.decode(latents.to(den.model_dtype or latents.dtype), height, width)
    return PipelineSample(images, latents, result, pg)


def _params(fn: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
