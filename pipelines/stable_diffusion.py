"""Native loop adapter for Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``).

SD 2.x 768 models are v-prediction: the process reads ``prediction_type`` from the scheduler config.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffsample.guidance.term import Cond

from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser


class StableDiffusionDenoiser(PipelineDenoiser):
    """SD 1.x/2.x: ``unet(x, t, encoder_hidden_states=...)`` on 4-channel VAE latents.

    ``encode`` calls ``pipe.encode_prompt`` (CLIP text encoder; the negative branch is the
    ``negative_prompt`` or the empty prompt, as the pipeline's CFG uses). ``decode`` divides by
    ``vae.config.scaling_factor`` and runs ``vae.decode`` + ``image_processor.postprocess``.
    """

    pipeline_classes = ("StableDiffusionPipeline",)
    network_name = "unet"
    default_cfg_scale = 7.5

    def model_fn(self, x: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        return self.network(x, model_time, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    def encode(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               num_images_per_prompt: int = 1, **kwargs: Any) -> Cond:
        pos, neg = self.pipe.encode_prompt(prompt, self.device, num_images_per_prompt, True,
                                           negative_prompt=negative_prompt, **kwargs)
        return Cond({"encoder_hidden_states": pos}, {"encoder_hidden_states": neg})

    def prepare_noise(self, batch: int, generator: Any = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        scale = self.pipe.vae_scale_factor
        height = height or self.network.config.sample_size * scale
        width = width or self.network.config.sample_size * scale
        return self._unit_noise(self.pipe.prepare_latents(batch, self.network.config.in_channels, height, width,
                                         self.network.dtype, self.device, generator))

    def decode(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        return self._vae_decode(x / self.pipe.vae.config.scaling_factor)
