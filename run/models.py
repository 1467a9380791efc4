"""Load a model as a diffsample ``Denoiser`` plus what guidance terms may use (``Resources``).

``load_model(None)`` gives the testbed's default bundled model and ``load_model(NAME)`` a bundled
model by name (:data:`diffsample.testbed.BUNDLED_MODELS`: the class-conditional MNIST model);
a path (or hub id, when cached locally) names a diffusers model folder with ``unet/`` (a
``UNet2DModel``, optionally class-conditional via ``num_class_embeds``) and ``scheduler/``.
Weights load only from safetensors; no remote code runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsample.guidance.term import Cond, Resources
from diffsample.solvers.noise_schedules import DiscreteVP

from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.testbed import BUNDLED_MODELS, DEFAULT_MODEL


class ModelLoadError(ValueError):
    """The model cannot be loaded (missing folder, no safetensors weights, unsupported layout)."""


@dataclass
class LoadedModel:
    """A model ready for sampling.

    Attributes:
        name: what was loaded (a bundled model's name, or the path / id).
        denoiser: ``(x, t, cond) -> denoised`` in the model's native (VP) space.
        sample_shape: per-sample shape ``(C, H, W)``.
        resources: what guidance terms may use (classifiers, conditionality).
        num_classes: classes of a class-conditional model (labels ``0 .. num_classes - 1``), else ``None``.
        null_class: label of the unconditional branch, else ``None``.
        device, dtype: where and in which precision the network runs.
        weight_files: the files whose content determines the network and its classifiers (cache
            fingerprints hash them); empty for a model built in code.
        metrics: names in :data:`diffsample.testbed.METRICS` that score its samples (first = its
            default); empty when none fits.
    """

    name: str
    denoiser: ModelDenoiser
    sample_shape: tuple[int, ...]
    resources: Resources
    num_classes: int | None
    null_class: int | None
    device: torch.device
    dtype: torch.dtype
    weight_files: tuple[Path, ...] = ()
    metrics: tuple[str, ...] = ()

    def cond(self, labels: Tensor | None) -> Cond | None:
        """Conditioning for class ``labels`` of shape ``(B,)`` (``None`` for unconditional models).

        Raises:
            ValueError: labels given to an unconditional model, or outside ``0 .. num_classes - 1``.
        """
        if self.num_classes is None:
            if labels is not None:
                raise ValueError(f"model {self.name!r} is unconditional; it takes no class labels")
            return None
        if labels is None:
            raise ValueError(f"model {self.name!r} is class-conditional; give class labels")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(f"class labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return Cond({"class_labels": labels}, {"class_labels": torch.full_like(labels, self.null_class)})

    @staticmethod
    def to_images(x: Tensor) -> Tensor:
        """Pixel-space samples in [-1, 1] to images in [0, 1] (clamped), same shape."""
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def _unet_fn(unet: torch.nn.Module):
    def model_fn(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return unet(x, t, **kwargs).sample

    return model_fn


def folder_weight_files(folder: str | os.PathLike) -> tuple[Path, ...]:
    """The files of a diffusers model folder that determine the model: ``unet/*.safetensors``
    (sorted), ``unet/config.json`` and ``scheduler/scheduler_config.json``, those that exist."""
    folder = Path(folder)
    files = sorted((folder / "unet").glob("*.safetensors")) + [folder / "unet" / "config.json",
                                                               folder / "scheduler" / "scheduler_config.json"]
    return tuple(f for f in files if f.is_file())


def load_model(spec: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a bundled model (``None``: the default one; a name in
    :data:`diffsample.testbed.BUNDLED_MODELS`) or a diffusers model folder.

    Raises:
        ModelLoadError: the folder or its ``unet/`` / ``scheduler/`` is missing, it has no
            safetensors weights (pickle checkpoints are refused), or its layout is unsupported.
    """
    from diffusers import UNet2DModel

    device = torch.device(device)
    if spec is None or str(spec) in BUNDLED_MODELS:
        name = DEFAULT_MODEL if spec is None else str(spec)
        bundled = BUNDLED_MODELS[name](device=device, dtype=dtype)
        unet, config = bundled.unet, bundled.scheduler_config
        classifier, clean = bundled.classifier, bundled.clean_classifier
        weight_files, metrics = tuple(bundled.weight_files), tuple(bundled.metrics)
    else:
        folder = Path(spec)
        name = str(spec)
        if not folder.is_dir():
            raise ModelLoadError(f"model {name!r} not found: not a local folder (hub downloads are off; "
                                 "point --model at a diffusers model folder or use a bundled model: "
                                 f"{', '.join(BUNDLED_MODELS)})")
        if _is_pipeline_folder(folder):
            return load_pipeline(folder, device=device, dtype=dtype)
        if not (folder / "unet").is_dir() or not (folder / "scheduler").is_dir():
            raise ModelLoadError(f"model folder {name!r} needs unet/ and scheduler/ subfolders (diffusers layout)")
        if not any((folder / "unet").glob("*.safetensors")):
            raise ModelLoadError(f"model folder {name!r} has no safetensors weights in unet/; pickle checkpoints "
                                 "(.bin/.pt/.ckpt) are refused")
        try:
            unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True).to(device=device, dtype=dtype)
        except Exception as exc:  # diffusers raises various types for bad configs
            raise ModelLoadError(f"cannot load {name!r}/unet as a UNet2DModel: {exc}") from None
        unet.eval().requires_grad_(False)
        import json

        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        classifier = clean = None
        weight_files, metrics = folder_weight_files(folder), ()
    prediction_type = config.get("prediction_type", "epsilon")
    noise_schedule = DiscreteVP.from_config(config)
    try:
        denoiser = ModelDenoiser(_unet_fn(unet), noise_schedule, prediction_type, model_dtype=dtype)
    except ValueError as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from None
    n_embeds = unet.config.get("num_class_embeds") if hasattr(unet.config, "get") else getattr(unet.config, "num_class_embeds", None)
    num_classes = (n_embeds - 1) if n_embeds else None
    sample_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    resources = Resources(classifier=classifier, clean_classifier=clean, num_classes=num_classes,
                          conditional=num_classes is not None)
    return LoadedModel(name, denoiser, sample_shape, resources, num_classes,
                       num_classes if num_classes is not None else None, device, dtype, weight_files, metrics)


@dataclass
class PipelineModel:
    """A diffusers pipeline folder loaded for the native loop (text-to-image and other families).

    Attributes:
        name: the folder.
        denoiser: the family adapter (:class:`~diffsample.pipelines.PipelineDenoiser`);
            ``denoiser.pipe`` is the pipeline.
    """

    name: str
    denoiser: Any


def _is_pipeline_folder(folder: Path) -> bool:
    """A ``model_index.json`` naming a pipeline other than ``DDPMPipeline`` (which the UNet path loads)."""
    import json

    index = folder / "model_index.json"
    if not index.is_file():
        return False
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except ValueError:
        return False
    return isinstance(name, str) and name != "DDPMPipeline"


def load_pipeline(folder: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> PipelineModel:
    """Load a diffusers pipeline folder offline (``local_files_only``, safetensors only, no remote
    code) and wrap it in its native-loop adapter.

    Raises:
        ModelLoadError: the folder cannot be loaded, or its pipeline has no native loop.
    """
    from diffusers import DiffusionPipeline

    from diffsample.pipelines import PipelineDenoiser

    name = str(folder)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                 torch_dtype=dtype)
    except Exception as exc:  # diffusers / transformers raise many types for bad folders
        raise ModelLoadError(f"cannot load {name!r} as a diffusers pipeline (safetensors only): {exc}") from None
    pipe.to(torch.device(device))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    try:
        denoiser = PipelineDenoiser.from_pipeline(pipe)
    except ValueError as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from None
    return PipelineModel(name, denoiser)
