"""Spectra of a latent diffusion model's normalised VAE latents, for CSFlow (arXiv 2606.08833).

A latent model (Stable Diffusion, SDXL, SD3, FLUX, PixArt) adds noise to VAE latents after the
pipeline's normalisation ``(z - shift_factor) * scaling_factor``, so the signal-to-noise ratio of
each frequency -- what CSFlow's weights are built from -- is that of those latents: ``P_d`` is the
mean RAPSD of the normalised latents (the per-channel spectra averaged) and ``P_n = 1``. A latent
frequency ``f_lat`` (cycles per latent pixel) shows in the decoded image at ``f_lat / f_vae`` cycles
per image pixel, ``f_vae`` the VAE's downsampling factor (8 for SD, SDXL, SD3 and FLUX), so the
spectrum file stores ``f_lat / f_vae`` and CSFlow converts it to cycles per degree with the
decoded image's viewing geometry. Detail the decoder synthesises above the latent Nyquist
(``0.5 / f_vae`` cycles per image pixel) is invisible to this analysis.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffsample.solvers.spectrum import Spectrum, spectrum_from_images


def vae_factor(vae: Any) -> int:
    """The VAE's spatial downsampling factor ``2 ** (len(block_out_channels) - 1)`` (diffusers'
    ``vae_scale_factor``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def normalised_latents(vae: Any, images: Tensor, batch_size: int = 16) -> Tensor:
    """Latents of ``images`` as the pipeline's denoiser sees them: the encoder's posterior mean,
    minus ``shift_factor`` (SD3, FLUX; 0 when absent), times ``scaling_factor``.

    Args:
        vae: a diffusers ``AutoencoderKL`` (``pipe.vae``).
        images: ``(N, C, H, W)`` in [-1, 1]; one channel is repeated to the VAE's input channels.
        batch_size: images per encoder call.

    Returns:
        ``(N, latent_channels, H / f_vae, W / f_vae)`` float32 latents on the CPU.

    Raises:
        ValueError: ``images`` not 4-D, or channels the VAE cannot take.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    cin = vae.config.in_channels
    if images.shape[1] == 1 and cin != 1:
        images = images.expand(-1, cin, -1, -1)
    if images.shape[1] != cin:
        raise ValueError(f"the VAE takes {cin} channels, images have {images.shape[1]}")
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    device, dtype = vae.device, vae.dtype
    out = []
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo:lo + batch_size].to(device=device, dtype=dtype)
        z = vae.encode(x).latent_dist.mean
        out.append(((z - shift) * scale).float().cpu())
    return torch.cat(out)


def latent_spectrum(pipe_or_vae: Any, images: Tensor, name: str = "", batch_size: int = 16,
                    **provenance: Any) -> Spectrum:
    """The CSFlow spectrum of a latent model: RAPSD of :func:`normalised_latents`, channels averaged,
    frequencies in image cycles per pixel (``f_lat / f_vae``), ``P_n = 1`` (module docstring).

    Args:
        pipe_or_vae: a diffusers pipeline with a ``vae``, or the ``AutoencoderKL`` itself.
        images: ``(N, C, H, W)`` in [-1, 1] at the resolution the model generates.
        name: the spectrum's name; ``provenance``: more fields for the file (source, command, ...).

    Raises:
        ValueError: no VAE, or images the VAE cannot take.
    """
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    if not hasattr(vae, "encode") or not hasattr(vae, "config"):
        raise ValueError(f"latent_spectrum needs a pipeline with a VAE or an AutoencoderKL, got {type(pipe_or_vae).__name__}")
    latents = normalised_latents(vae, images, batch_size=batch_size)
    info = {"vae_scaling_factor": float(vae.config.scaling_factor),
            "vae_shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0), **provenance}
    return spectrum_from_images(latents, name=name, channels="mean", latent_factor=vae_factor(vae), **info)


def pipeline_spacing(pipe: Any, height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """The csflow options that make its default spacing the pipeline's own (arXiv 2606.08833 mixes the
    CSF weights with the default grid in CDF space): a flow pipeline (SD3, FLUX) spaces its steps
    uniformly in flow time warped by its shift -- ``{"base": "flow", "shift": s}`` with the scheduler's
    ``shift``, or ``exp(mu)`` for ``height x width`` under dynamic shifting (FLUX); a discrete-VP
    pipeline (SD, SDXL, PixArt) uniformly in the diffusers timestep -- ``{"base": "model"}``.

    Raises:
        ValueError: a pipeline diffsample has no adapter for.
    """
    import math

    from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser

    den = PipelineDenoiser.from_pipeline(pipe)
    if not den.process.flow:
        return {"base": "model"}
    noise = den.prepare_noise(1, torch.Generator().manual_seed(0), height, width)
    mu = den.scheduler_kwargs(1, noise, height, width).get("mu")
    shift = math.exp(mu) if mu is not None else float(pipe.scheduler.config.get("shift", 1.0))
    return {"base": "flow", "shift": shift}


def csflow_for_pipeline(pipe: Any, spectrum: str | None = None, height: int | None = None, width: int | None = None,
                        **options: Any):
    """A :class:`~diffsample.solvers.csflow.CSFlow` schedule for ``pipe``: its default spacing is the
    pipeline's (:func:`pipeline_spacing`), ``spectrum`` a latent spectrum of this VAE (:func:`latent_spectrum`,
    ``diffsample spectrum IMAGES --pipeline FOLDER``); ``options`` (``mix``, viewing geometry, or
    ``shift`` / ``base`` to override) go to :class:`CSFlow`. Pass it as ``schedule=`` to
    :func:`~diffsample.pipelines.sample_pipeline` or :func:`~diffsample.pipelines.attach.attach`.

    Raises:
        ValueError: as :func:`pipeline_spacing` and :class:`CSFlow`.
    """
    from diffsample.solvers.csflow import CSFlow

    return CSFlow(**{**pipeline_spacing(pipe, height, width), "spectrum": spectrum, **options})
