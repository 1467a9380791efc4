"""Native loop adapter for Stable Diffusion 3 (``StableDiffusion3Pipeline``): rectified flow,
MMDiT transformer, CLIP x 2 + T5 text encoders."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffsample.guidance.term import Cond

from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """Resolution-dependent ``mu`` of SD3 / FLUX (diffusers ``calculate_shift``): linear in the
    number of image tokens from ``base_shift`` to ``max_shift``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class StableDiffusion3Denoiser(PipelineDenoiser):
    """SD3: ``transformer(hidden_states=x, timestep=1000 t, encoder_hidden_states, pooled_projections)``
    predicts the flow velocity ``eps - x0``; ``t`` is the flow sigma. ``decode`` applies
    ``x / scaling_factor + shift_factor``. With ``use_dynamic_shifting`` the pipeline's ``mu`` is
    passed to the scheduler when the grid is read from it.
    """

    pipeline_classes = ("StableDiffusion3Pipeline",)
    network_name = "transformer"
    default_cfg_scale = 7.0

    def model_fn(self, x: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        return self.network(hidden_states=x, timestep=model_time.to(torch.float32),
                            encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def encode(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               num_images_per_prompt: int = 1, **kwargs: Any) -> Cond:
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=True, device=self.device, num_images_per_prompt=num_images_per_prompt,
            **kwargs)
        return Cond({"encoder_hidden_states": pos, "pooled_projections": pooled},
                    {"encoder_hidden_states": neg, "pooled_projections": neg_pooled})

    def prepare_noise(self, batch: int, generator: Any = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        pipe = self.pipe
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        return pipe.prepare_latents(batch, self.network.config.in_channels, height, width, self.network.dtype,
                                    self.device, generator)

    def scheduler_kwargs(self, steps: int, noise: Tensor, height: int | None, width: int | None) -> dict[str, Any]:
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        patch = self.network.config.patch_size
        seq = (noise.shape[-2] // patch) * (noise.shape[-1] // patch)
        return {"mu": calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                      config.get("base_shift", 0.5), config.get("max_shift", 1.16))}

    def decode(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        vae = self.pipe.vae
        return self._vae_decode(x / vae.config.scaling_factor + vae.config.shift_factor)
