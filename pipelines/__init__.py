"""Native loops ("we drive") over diffusers pipelines: one adapter per pipeline family.

``PipelineDenoiser.from_pipeline(pipe)`` picks the family adapter; :func:`sample_pipeline` runs our
sampler with it. Families: DDPM (:mod:`.ddpm`), Stable Diffusion 1.x/2.x (:mod:`.stable_diffusion`),
SDXL (:mod:`.sdxl`), SD3 (:mod:`.sd3`), FLUX (:mod:`.flux`), PixArt-alpha/Sigma (:mod:`.pixart`).
The process and step grid shared with the scheduler shim live in :mod:`.process`.
"""

from diffsample.pipelines.pipeline_denoiser import FAMILY_ADAPTERS, PipelineDenoiser
from diffsample.pipelines.ddpm import DDPMDenoiser
from diffsample.pipelines.flux import FluxDenoiser
from diffsample.pipelines.native_loop import PipelineSample, guided_denoiser, sample_pipeline
from diffsample.pipelines.pixart import PixArtDenoiser
from diffsample.pipelines.process import PipelineGrid, Process, grid_from_schedule, grid_from_scheduler, process_from_config
from diffsample.pipelines.sd3 import StableDiffusion3Denoiser
from diffsample.pipelines.sdxl import StableDiffusionXLDenoiser
from diffsample.pipelines.stable_diffusion import StableDiffusionDenoiser

ADAPTERS: tuple[type[PipelineDenoiser], ...] = tuple(FAMILY_ADAPTERS)
"""Family adapters, matched against the pipeline's class (and base classes) by name."""

__all__ = [
    "ADAPTERS", "DDPMDenoiser", "FluxDenoiser", "PipelineDenoiser", "PipelineGrid", "PipelineSample",
    "PixArtDenoiser", "Process", "StableDiffusion3Denoiser", "StableDiffusionDenoiser", "StableDiffusionXLDenoiser",
    "grid_from_schedule", "grid_from_scheduler", "guided_denoiser", "process_from_config", "sample_pipeline",
]
