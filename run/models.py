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

from diffsample.core.files import json_object, read_json
from diffsample.guidance.term import Cond, Resources
from diffsample.solvers.noise_schedules import DiscreteVP

from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.samplers.per_step_model import PerStepModel
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
        grid: a distilled student's grid, the only times (native, noisiest first) it may be
            evaluated at (:func:`check_student_grid`); ``None`` for any other model.
        metrics: names in :data:`diffsample.testbed.METRICS` that score its samples (first = its
            default); empty when none fits.
    """

    name: str
    denoiser: ModelDenoiser | PerStepModel
    sample_shape: tuple[int, ...]
    resources: Resources
    num_classes: int | None
    null_class: int | None
    device: torch.device
    dtype: torch.dtype
    weight_files: tuple[Path, ...] = ()
    metrics: tuple[str, ...] = ()
    grid: tuple[float, ...] | None = None

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


MAX_SAMPLE_ELEMENTS = 1 << 24
"""Largest per-sample tensor (``in_channels * height * width``) a UNet folder may declare
(16.8 M elements, 64 MiB in float32: a 4096 x 4096 single-channel or a 2048 x 2048 x 4 sample)."""
MAX_TRAIN_TIMESTEPS = 1_000_000
_CONFIG_BYTES = 1 << 20  # scheduler / unet configs are a few KiB


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def check_folder_files(folder: Path) -> None:
    """Refuse a model folder holding, at its top level or one level down, an entry that is
    neither a directory nor a regular file (a FIFO, socket or device, e.g. a link to
    ``/dev/zero``): loaders would block on it or read without end.

    Raises:
        ModelLoadError: naming the entry.
    """
    import stat

    subfolders = [folder] + [d for d in folder.iterdir() if d.is_dir()]
    for sub in subfolders:
        for entry in sub.iterdir():
            try:
                mode = entry.stat().st_mode
            except OSError:  # a dangling link: the loader reports it if it needs the file
                continue
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ModelLoadError(f"model folder {str(folder)!r}: {str(entry)!r} is not a regular file "
                                     "(a FIFO, socket or device); refused")


def _config(path: Path, what: str) -> dict[str, Any]:
    try:
        return json_object(read_json(path, what, max_bytes=_CONFIG_BYTES), f"{what} {str(path)!r}")
    except FileNotFoundError:
        raise ModelLoadError(f"{what} {str(path)!r} not found (diffusers layout: save_pretrained writes it)") from None
    except ValueError as exc:
        raise ModelLoadError(_one_line(exc)) from None


def scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of a model folder, checked: a regular JSON file (1 MiB
    at most) holding an object whose ``num_train_timesteps`` is an integer in 2..1,000,000,
    ``beta_start`` / ``beta_end`` numbers in (0, 1), ``trained_betas`` (if given) a list of
    2..1,000,000 numbers in (0, 1), ``prediction_type`` a string and ``variance_type`` not learned
    (a 2C-channel network output).

    Raises:
        ModelLoadError: the file is missing or fails a check (one line naming it).
    """
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    what = f"scheduler config {str(path)!r}"
    config = _config(path, "scheduler config")
    n = config.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_TRAIN_TIMESTEPS:
        raise ModelLoadError(f"{what}: num_train_timesteps must be an integer in 2..{MAX_TRAIN_TIMESTEPS}, got {n!r}")
    for key in ("beta_start", "beta_end"):
        v = config.get(key, 0.01)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ModelLoadError(f"{what}: {key} must be a number in (0, 1), got {v!r}")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or not 2 <= len(betas) <= MAX_TRAIN_TIMESTEPS or any(
                isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1 for b in betas):
            raise ModelLoadError(f"{what}: trained_betas must be a list of 2..{MAX_TRAIN_TIMESTEPS} numbers in (0, 1)")
    for key in ("prediction_type", "beta_schedule"):
        if key in config and not isinstance(config[key], str):
            raise ModelLoadError(f"{what}: {key} must be a string, got {config[key]!r}")
    if config.get("variance_type") in ("learned", "learned_range"):
        raise ModelLoadError(f"{what}: variance_type {config['variance_type']!r} (a 2C-channel network output) is "
                             "not supported; valid: fixed_small, fixed_large or unset")
    return config


def _spatial(size: Any) -> tuple[int, int]:
    """``sample_size`` (an int, or ``[height, width]``) as ``(height, width)``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def unet_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``unet/config.json`` of a model folder, checked before the network is built: a regular
    JSON file (1 MiB at most) holding an object with ``in_channels`` an integer >= 1 and
    ``sample_size`` an integer >= 1 (or ``[height, width]``) such that one sample,
    ``in_channels * height * width``, stays within :data:`MAX_SAMPLE_ELEMENTS`.

    Raises:
        ModelLoadError: the file is missing or fails a check (one line naming it).
    """
    path = Path(folder) / "unet" / "config.json"
    what = f"unet config {str(path)!r}"
    config = _config(path, "unet config")
    channels, size = config.get("in_channels", 3), config.get("sample_size")

    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not is_count(channels):
        raise ModelLoadError(f"{what}: in_channels must be an integer >= 1, got {channels!r}")
    if not (is_count(size) or (isinstance(size, list) and len(size) == 2 and all(is_count(v) for v in size))):
        raise ModelLoadError(f"{what}: sample_size must be an integer >= 1 or [height, width], got {size!r}")
    h, w = _spatial(size)
    if channels * h * w > MAX_SAMPLE_ELEMENTS:
        raise ModelLoadError(f"{what}: one sample of in_channels={channels}, sample_size={size} has "
                             f"{channels * h * w:,} elements, more than the limit {MAX_SAMPLE_ELEMENTS:,}; refused "
                             "before allocating")
    return config


def load_model(spec: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a bundled model (``None``: the default one; a name in
    :data:`diffsample.testbed.BUNDLED_MODELS`) or a diffusers model folder.

    Raises:
        ModelLoadError: the folder or its ``unet/`` / ``scheduler/`` is missing, it has no
            safetensors weights (pickle checkpoints are refused), its layout is unsupported, it
            holds a FIFO / device / socket (:func:`check_folder_files`), or a config fails its
            checks (:func:`scheduler_config`, :func:`unet_config`: not a JSON object, an absurd
            sample size, ...); one line each, before the network is built.
    """
    from diffusers import UNet2DModel

    device = torch.device(device)
    if spec is None or str(spec) in BUNDLED_MODELS:
        name = DEFAULT_MODEL if spec is None else str(spec)
        try:
            bundled = BUNDLED_MODELS[name](device=device, dtype=dtype)
        except (FileNotFoundError, ValueError) as exc:  # missing or unreadable bundled weights
            raise ModelLoadError(f"bundled model {name!r}: {_one_line(exc)}") from None
        unet, config = bundled.unet, bundled.scheduler_config
        grid, step_unets = bundled.grid, tuple(bundled.step_unets)
        classifier, clean = bundled.classifier, bundled.clean_classifier
        weight_files, metrics = tuple(bundled.weight_files), tuple(bundled.metrics)
    else:
        folder = Path(spec)
        name = str(spec)
        if not folder.is_dir():
            raise ModelLoadError(f"model {name!r} not found: not a local folder (hub downloads are off; "
                                 "point --model at a diffusers model folder or use a bundled model: "
                                 f"{', '.join(BUNDLED_MODELS)})")
        check_folder_files(folder)
        if _is_pipeline_folder(folder):
            return load_pipeline(folder, device=device, dtype=dtype)
        if not (folder / "unet").is_dir() or not (folder / "scheduler").is_dir():
            raise ModelLoadError(f"model folder {name!r} needs unet/ and scheduler/ subfolders (diffusers layout)")
        if not any((folder / "unet").glob("*.safetensors")):
            raise ModelLoadError(f"model folder {name!r} has no safetensors weights in unet/; pickle checkpoints "
                                 "(.bin/.pt/.ckpt) are refused")
        config = scheduler_config(folder)  # checked before the network is built
        unet_config(folder)
        try:
            unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True).to(device=device, dtype=dtype)
        except Exception as exc:  # diffusers raises various types for bad configs
            raise ModelLoadError(f"cannot load {name!r}/unet as a UNet2DModel: {_one_line(exc)}") from None
        unet.eval().requires_grad_(False)
        classifier = clean = None
        weight_files, metrics = folder_weight_files(folder), ()
        grid, step_unets = None, ()
    prediction_type = config.get("prediction_type", "epsilon")
    try:
        noise_schedule = DiscreteVP.from_config(config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"model {name!r}: scheduler config: {_one_line(exc)}") from None
    try:
        denoiser = ModelDenoiser(_unet_fn(unet), noise_schedule, prediction_type, model_dtype=dtype)
        if step_unets:  # a step-decoupled student: one network per grid point
            denoiser = PerStepModel([ModelDenoiser(_unet_fn(u), noise_schedule, prediction_type, model_dtype=dtype)
                                     for u in step_unets], grid)
    except ValueError as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from None
    n_embeds = unet.config.get("num_class_embeds") if hasattr(unet.config, "get") else getattr(unet.config, "num_class_embeds", None)
    num_classes = (n_embeds - 1) if n_embeds else None
    sample_shape = (unet.config.in_channels, *_spatial(unet.config.sample_size))
    resources = Resources(classifier=classifier, clean_classifier=clean, num_classes=num_classes,
                          conditional=num_classes is not None)
    return LoadedModel(name, denoiser, sample_shape, resources, num_classes,
                       num_classes if num_classes is not None else None, device, dtype, weight_files, metrics, grid)


def check_student_grid(model: "LoadedModel | PipelineModel", grid: Any) -> None:
    """Refuse a run whose grid evaluates a distilled student at a time it was not distilled for.

    A student (``model.grid`` set) may be evaluated only at its own grid's times: with the
    ``trailing`` schedule, ``steps`` equal to its own step count or a count whose trailing grid is
    a subset of it (``mnist-pd-4`` at 1, 2 or 4 steps). ``grid`` is the run's ``Grid``.

    Raises:
        ValueError: one line naming the model, the times it cannot give and the valid steps.
    """
    times = getattr(model, "grid", None)
    if times is None:
        return
    asked = [float(v) for v in grid.t_list[:grid.steps]]
    bad = [v for v in asked if min(abs(v - g) for g in times) > 1e-3]
    if bad:
        from diffsample.solvers.step_schedules import TimeUniform

        ns = model.denoiser.noise_schedule
        valid = [n for n in range(1, len(times) + 1)
                 if all(min(abs(float(v) - g) for g in times) <= 1e-3 for v in TimeUniform(spacing="trailing")(ns, n))]
        raise ValueError(f"model {model.name!r} is a {len(times)}-step student distilled at t = "
                         f"{[round(g) for g in times]}; this run's grid asks for t = {[round(v, 1) for v in bad]}, which "
                         f"its grid cannot give; valid: --schedule trailing with --steps "
                         f"{' or '.join(str(n) for n in valid)}")


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
    """A ``model_index.json`` naming a pipeline other than ``DDPMPipeline`` (which the UNet path loads).

    Raises:
        ModelLoadError: a ``model_index.json`` that is not a regular JSON file holding an object.
    """
    index = folder / "model_index.json"
    if not index.exists():
        return False
    try:
        data = json_object(read_json(index, "model index"), f"model index {str(index)!r}")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_one_line(exc)) from None
    name = data.get("_class_name")
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
