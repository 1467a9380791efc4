"""Native loop adapter for SDXL (``StableDiffusionXLPipeline``): two text encoders, pooled text
embeddings and size/crop "time ids" as added conditioning."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffsample.guidance.term import Cond

from diffsample.pipelines.stable_diffusion import StableDiffusionDenoiser


class StableDiffusionXLDenoiser(StableDiffusionDenoiser):
    """SDXL: ``unet(x, t, encoder_hidden_states, added_cond_kwargs={"text_embeds", "time_ids"})``.

    The added conditioning is kept as flat tensors in ``Cond`` (``text_embeds``, ``time_ids``), so
    CFG batches both branches in one call. ``time_ids`` are ``pipe._get_add_time_ids(original_size =
    target_size = (height, width), crops (0, 0))``, the pipeline's defaults. ``decode`` upcasts an
    fp16 VAE with ``force_upcast`` and applies ``latents_mean`` / ``latents_std`` when configured.
    """

    pipeline_classes = ("StableDiffusionXLPipeline",)
    default_cfg_scale = 5.0

    def model_fn(self, x: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.network(x, model_time, encoder_hidden_states=cond["encoder_hidden_states"],
                            added_cond_kwargs=added, return_dict=False)[0]

    def encode(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
               **kwargs: Any) -> Cond:
        pipe = self.pipe
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device=self.device,
                                                          num_images_per_prompt=num_images_per_prompt,
                                                          do_classifier_free_guidance=True,
                                                          negative_prompt=negative_prompt, **kwargs)
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype,
                                          text_encoder_projection_dim=proj).to(self.device)
        time_ids = time_ids.repeat(pos.shape[0], 1)
        return Cond({"encoder_hidden_states": pos, "text_embeds": pooled, "time_ids": time_ids},
                    {"encoder_hidden_states": neg, "text_embeds": neg_pooled, "time_ids": time_ids})

    def decode(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean_t = torch.tensor(mean).view(shape).to(x)
            std_t = torch.tensor(std).view(shape).to(x)
            latents = x * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = x / vae.config.scaling_factor
        return self._vae_decode(latents)
