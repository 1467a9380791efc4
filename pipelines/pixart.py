"""Native loop adapter for PixArt-alpha / PixArt-Sigma (``PixArtAlphaPipeline``,
``PixArtSigmaPipeline``): DiT with T5 conditioning and learned-sigma output channels."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffsample.guidance.term import Cond

from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser


class PixArtDenoiser(PipelineDenoiser):
    """PixArt: ``transformer(x, encoder_hidden_states, encoder_attention_mask, timestep,
    added_cond_kwargs={"resolution": None, "aspect_ratio": None})``. The network outputs ``2 C``
    channels (eps and learned variance); like the pipeline we keep the first ``C`` (eps).
    """

    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    network_name = "transformer"
    default_cfg_scale = 4.5

    def model_fn(self, x: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        t = model_time
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.network(x, encoder_hidden_states=cond["encoder_hidden_states"],
                           encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        if self.network.config.out_channels // 2 == x.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    def encode(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               num_images_per_prompt: int = 1, **kwargs: Any) -> Cond:
        kwargs.setdefault("clean_caption", False)
        pos, pos_mask, neg, neg_mask = self.pipe.encode_prompt(
            prompt, True, negative_prompt=negative_prompt if negative_prompt is not None else "",
            num_images_per_prompt=num_images_per_prompt, device=self.device, **kwargs)
        return Cond({"encoder_hidden_states": pos, "encoder_attention_mask": pos_mask},
                    {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask})

    def prepare_noise(self, batch: int, generator: Any = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        pipe = self.pipe
        size = self.network.config.sample_size * pipe.vae_scale_factor
        return self._unit_noise(pipe.prepare_latents(batch, self.network.config.in_channels, height or size, width or size,
                                    self.network.dtype, self.device, generator))

    def decode(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        return self._vae_decode(x / self.pipe.vae.config.scaling_factor)
