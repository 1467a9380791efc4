"""Native loop adapter for ``DDPMPipeline`` (unconditional pixel-space UNet)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffsample.pipelines.pipeline_denoiser import PipelineDenoiser


class DDPMDenoiser(PipelineDenoiser):
    """``DDPMPipeline``: ``unet(x, t).sample``; pixel space in [-1, 1]; no text conditioning.

    ``prepare_noise`` draws ``randn_tensor((B, C, H, W), generator)`` as the pipeline does
    (``height`` / ``width`` are ignored: the UNet's ``sample_size`` decides).
    """

    pipeline_classes = ("DDPMPipeline",)
    network_name = "unet"
    text_conditioned = False

    def model_fn(self, x: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        out = self.network(x, model_time, **cond)
        return out.sample if hasattr(out, "sample") else out[0]

    def encode(self, prompt=None, negative_prompt=None, num_images_per_prompt: int = 1, **kwargs: Any):
        if prompt is not None:
            raise ValueError(f"{type(self.pipe).__name__} is unconditional; it takes no prompt")
        return super().encode()

    def batch_size(self, prompt, num_images_per_prompt: int) -> int:
        return num_images_per_prompt

    def prepare_noise(self, batch: int, generator: Any = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        cfg = self.network.config
        size = cfg.sample_size
        shape = (batch, cfg.in_channels, *(size if not isinstance(size, int) else (size, size)))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.network.dtype)

    def decode(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()
