"""Native loop adapter for FLUX.1 (``FluxPipeline``): rectified flow on packed 2 x 2 latent
patches, guidance distillation as a conditioning input, optional true CFG."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsample.guidance.term import Cond

from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser
from diffsample.pipelines.sd3 import calculate_shift


class FluxDenoiser(PipelineDenoiser):
    """FLUX: ``transformer(hidden_states=x, timestep=t, guidance, pooled_projections,
    encoder_hidden_states, txt_ids, img_ids)`` on packed latents ``x`` of shape ``(B, h w / 4, 4 C)``
    (``pipe._pack_latents``); ``t`` is the flow sigma (the pipeline passes ``timestep / 1000``).

    The distilled guidance scale of FLUX.1-dev is *conditioning* (``encode(..., guidance_scale=3.5)``
    puts a ``guidance`` tensor of shape ``(B,)`` in both branches), not a guidance term. True CFG is
    our ``CFG`` term over the negative prompt (``default_cfg_scale = 1``: off). ``txt_ids`` / ``img_ids``
    (positions, no batch dimension) are kept on the adapter: ``encode`` sets ``txt_ids`` and
    ``prepare_noise`` sets ``img_ids`` for the latent size. The pipeline passes ``sigmas =
    linspace(1, 1/N, N)`` and ``mu`` (image-size shift) to the scheduler; so do we.
    """

    pipeline_classes = ("FluxPipeline",)
    network_name = "transformer"
    default_cfg_scale = 1.0

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.txt_ids: Tensor | None = None
        self.img_ids: Tensor | None = None

    def model_time(self, t: Tensor) -> Tensor:
        return t

    def model_fn(self, x: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        if self.img_ids is None or self.txt_ids is None:
            raise ValueError("FluxDenoiser needs encode(...) and prepare_noise(...) before sampling (txt_ids, img_ids)")
        guidance = cond.get("guidance")
        return self.network(hidden_states=x, timestep=model_time.to(x.dtype), guidance=guidance,
                            pooled_projections=cond["pooled_projections"],
                            encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=self.txt_ids,
                            img_ids=self.img_ids, return_dict=False)[0]

    def encode(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               num_images_per_prompt: int = 1, guidance_scale: float = 3.5, **kwargs: Any) -> Cond:
        pipe = self.pipe
        pos, pooled, txt_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                  num_images_per_prompt=num_images_per_prompt, **kwargs)
        self.txt_ids = txt_ids
        positive: dict[str, Any] = {"encoder_hidden_states": pos, "pooled_projections": pooled}
        if self.network.config.guidance_embeds:
            positive["guidance"] = torch.full((pos.shape[0],), float(guidance_scale), device=pos.device,
                                              dtype=torch.float32)
        neg_prompt = negative_prompt if negative_prompt is not None else ""
        neg, neg_pooled, _ = pipe.encode_prompt(prompt=[neg_prompt] * (1 if isinstance(prompt, str) or prompt is None
                                                                       else len(prompt))
                                                if isinstance(neg_prompt, str) else neg_prompt,
                                                prompt_2=None, device=self.device,
                                                num_images_per_prompt=num_images_per_prompt, **kwargs)
        negative = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
        if "guidance" in positive:
            negative["guidance"] = positive["guidance"]
        return Cond(positive, negative)

    def prepare_noise(self, batch: int, generator: Any = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        pipe = self.pipe
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        latents, img_ids = pipe.prepare_latents(batch, self.network.config.in_channels // 4, height, width,
                                                self.network.dtype, self.device, generator)
        self.img_ids = img_ids
        self._size = (height, width)
        return latents

    def noise_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        return tuple(self.prepare_noise(1, torch.Generator().manual_seed(0), height, width).shape[1:])

    def scheduler_kwargs(self, steps: int, noise: Tensor, height: int | None, width: int | None) -> dict[str, Any]:
        config = self.pipe.scheduler.config
        kwargs: dict[str, Any] = {}
        if not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        kwargs["mu"] = calculate_shift(noise.shape[1], config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15))
        return kwargs

    def decode(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        pipe = self.pipe
        height, width = (height, width) if height and width else getattr(self, "_size", (None, None))
        if height is None:
            raise ValueError("FluxDenoiser.decode needs height and width (or a prior prepare_noise call)")
        latents = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
        vae = pipe.vae
        return self._vae_decode(latents / vae.config.scaling_factor + vae.config.shift_factor)
