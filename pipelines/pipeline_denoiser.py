"""``PipelineDenoiser``: a diffsample ``Denoiser`` built from a diffusers pipeline's components.

The "we drive" front-end (docs/design.md#one-attached-pipeline-call, last paragraph): the network call, prompt encoding, initial
latents and decoding reuse the pipeline's own methods (``encode_prompt``, ``prepare_latents``,
``vae.decode``, ``image_processor.postprocess``); the loop, the solver, the grid and the guidance are
ours. One subclass per pipeline family (``ddpm.py``, ``stable_diffusion.py``, ``sdxl.py``, ``sd3.py``,
``flux.py``, ``pixart.py``) implements ``model_fn`` / ``encode`` / ``prepare_noise`` / ``decode``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from diffsample.guidance.term import Cond
from diffsample.samplers.denoisers import ModelDenoiser

from diffsample.pipelines.process import Process, process_from_scheduler


FAMILY_ADAPTERS: list[type["PipelineDenoiser"]] = []
"""The family adapters, in definition order: every subclass that names ``pipeline_classes`` adds
itself (the family modules are imported by :mod:`diffsample.pipelines`)."""


def adapter_class(pipe: Any) -> type["PipelineDenoiser"] | None:
    """The family adapter for ``pipe``'s class (matched by name, including base classes), or ``None``."""
    for klass in type(pipe).__mro__:
        for adapter in FAMILY_ADAPTERS:
            if klass.__name__ in adapter.pipeline_classes:
                return adapter
    return None


class PipelineDenoiser(ModelDenoiser):
    """``(x, t, cond) -> denoised`` for a diffusers pipeline's network (``x`` in the pipeline's latent
    space: ``(B, C, h, w)``, or packed ``(B, tokens, C)`` for FLUX; ``t`` in noise-schedule time:
    the diffusers timestep for VP models, the flow sigma for rectified-flow models).

    Build with :meth:`from_pipeline`, which picks the family adapter from the pipeline's class.

    Attributes:
        pipe: the pipeline (its components are used in place, never copied).
        process: noise schedule and prediction type read from ``pipe.scheduler``.
        default_cfg_scale: the pipeline's default guidance scale (``None``: no CFG by default).
    """

    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    network_name: ClassVar[str] = "unet"
    default_cfg_scale: ClassVar[float | None] = None
    text_conditioned: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "pipeline_classes" in cls.__dict__ and cls.pipeline_classes:
            FAMILY_ADAPTERS.append(cls)

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.network = getattr(pipe, self.network_name, None)
        if self.network is None:
            raise ValueError(f"{type(pipe).__name__} has no {self.network_name!r} component")
        self.process: Process = process_from_scheduler(pipe.scheduler)
        super().__init__(self.model_fn, self.process.noise_schedule, self.process.prediction_type,
                         time_fn=self.model_time, model_dtype=getattr(self.network, "dtype", None))

    @classmethod
    def from_pipeline(cls, pipe: Any) -> "PipelineDenoiser":
        """The family adapter for ``pipe`` (by pipeline class name, including subclasses).

        Raises:
            ValueError: an unsupported pipeline (the message lists the supported ones), or one
                without a scheduler.
        """
        if getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"{type(pipe).__name__} has no scheduler; a diffusers pipeline with a scheduler is expected")
        adapter = adapter_class(pipe)
        if adapter is not None:
            return adapter(pipe)
        names = sorted(n for a in FAMILY_ADAPTERS for n in a.pipeline_classes)
        raise ValueError(f"no native loop for {type(pipe).__name__}; supported: {', '.join(names)} "
                         "(any pipeline that calls scheduler.step works with diffsample.attach)")

    # ---- family hooks -----------------------------------------------------------------------------
    def model_time(self, t: Tensor) -> Tensor:
        """The network's time input for schedule time ``t`` (scheduler units by default)."""
        return self.process.timestep(t)

    def model_fn(self, x: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        """Raw network output for ``x`` (already in the network dtype)."""
        raise NotImplementedError

    def encode(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               num_images_per_prompt: int = 1, **kwargs: Any) -> Cond:
        """Conditioning for ``prompt`` (positive) and ``negative_prompt`` (negative branch, ``""``
        when not given), batched ``len(prompts) * num_images_per_prompt``."""
        return Cond()

    def batch_size(self, prompt: str | list[str] | None, num_images_per_prompt: int) -> int:
        n = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        return n * num_images_per_prompt

    def prepare_noise(self, batch: int, generator: Any = None, height: int | None = None,
                      width: int | None = None) -> Tensor:
        """Initial standard-normal latents ``(batch, ...)`` drawn exactly as the pipeline draws them
        (its ``prepare_latents`` with ``generator``)."""
        raise NotImplementedError

    def noise_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Per-sample latent shape (for per-sample seeded noise)."""
        return tuple(self.prepare_noise(1, torch.Generator().manual_seed(0), height, width).shape[1:])

    def scheduler_kwargs(self, steps: int, noise: Tensor, height: int | None, width: int | None) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments the pipeline passes (FLUX: ``sigmas`` and ``mu``)."""
        return {}

    def decode(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` float32 in [0, 1] from latents ``x``."""
        raise NotImplementedError

    # ---- shared helpers ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return getattr(self.pipe, "_execution_device", None) or torch.device("cpu")

    def _unit_noise(self, latents: Tensor) -> Tensor:
        """Undo ``* scheduler.init_noise_sigma`` of SD-style ``prepare_latents`` (Euler-type schedulers
        scale by the VE sigma_max); our sampler scales standard-normal noise itself."""
        scale = float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0))
        return latents if scale == 1.0 else latents / scale

    def _vae_decode(self, latents: Tensor) -> Tensor:
        """``vae.decode`` then the pipeline's ``image_processor.postprocess`` to [0, 1] tensors."""
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        image = self.pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * image.shape[0])
        return image.float().cpu()
