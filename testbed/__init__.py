"""Real testbeds shipped with diffsample: the exact Gaussian mixture (:mod:`.gmm`) and the bundled
MNIST model (:mod:`.mnist`).

The layers above find the bundled models and their quality metrics here, by name, without naming
any of them:

* :data:`BUNDLED_MODELS` -- name -> loader ``(device, dtype) -> BundledModel`` (the network, its
  scheduler config, classifiers, the files that determine it, the metrics that fit its samples);
  :data:`DEFAULT_MODEL` is the one loaded when no model is named. :data:`BUNDLED_INFO` gives each
  one's summary, default solver, schedule and steps and CFG policy without loading it: the MNIST
  teacher and its distilled few-step students (``mnist-pd-4``, ``mnist-pd-2``,
  ``mnist-decoupled-2``, ``mnist-mfd-1``; :mod:`.mnist.students`).
* :data:`METRICS` -- name -> :class:`Metric` (a sample-quality score); :data:`DEFAULT_METRIC` is
  the sweep's default.

Loaders and scores import their testbed lazily, so importing this package costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BundledModel:
    """A bundled model's parts, as its loader in :data:`BUNDLED_MODELS` returns them.

    Attributes:
        unet: a diffusers ``UNet2DModel`` in eval mode without gradients, on the requested device
            and dtype (``unet(x_t, t, class_labels=y).sample``).
        scheduler_config: its training schedule as a diffusers scheduler config dict.
        classifier: noise-aware classifier ``(x_t, t) -> logits (B, K)``, or ``None``.
        clean_classifier: classifier on clean samples ``x0 -> logits (B, K)``, or ``None``.
        weight_files: the files whose content determines the network and its classifiers (cache
            fingerprints hash them).
        metrics: names in :data:`METRICS` that score this model's samples (first = its default).
        grid: for a distilled student, the only times (in the scheduler's timesteps, noisiest
            first) it may be evaluated at; ``None``: any time.
        step_unets: for a step-decoupled student, one network per point of ``grid`` (``unet`` is
            the first); empty otherwise.
    """

    unet: Any
    scheduler_config: dict
    classifier: Any = None
    clean_classifier: Any = None
    weight_files: tuple[Path, ...] = ()
    metrics: tuple[str, ...] = ()
    grid: tuple[float, ...] | None = None
    step_unets: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """What :data:`BUNDLED_INFO` says about a bundled model without loading it.

    Attributes:
        summary: one line for ``diffsample list models``.
        solver, schedule, steps: the sampler ``generate`` uses when the caller gives none.
        cfg: the model's classifier-free guidance policy, one line.
    """

    summary: str
    solver: str = "dpmpp_2m"
    schedule: str = "trailing"
    steps: int = 20
    cfg: str = "off unless --cfg-scale is given (2 model evaluations per step)"


@dataclass(frozen=True)
class Metric:
    """A sample-quality metric of a bundled testbed.

    Attributes:
        score: ``(samples, classes) -> {name: value}``: ``samples`` ``(N, C, H, W)`` in model space,
            ``classes`` the ``N`` class labels the samples were drawn for, or ``None``.
        headline: the key of ``score``'s result that tables and plots show.
        needs: what the metric needs, for the one-line refusal on another model.
        summary: one line on what it measures.
    """

    score: Callable[[Any, Sequence[int] | None], dict[str, float]]
    headline: str
    needs: str
    summary: str


def _mnist_files() -> tuple[Path, ...]:
    from diffsample.testbed import mnist

    folder = mnist.MODEL_DIR
    files = sorted((folder / "unet").glob("*.safetensors")) + [folder / "unet" / "config.json",
                                                               folder / "scheduler" / "scheduler_config.json"]
    extra = [mnist.WEIGHTS_DIR / "classifier.safetensors", mnist.WEIGHTS_DIR / "noisy_classifier.safetensors"]
    return tuple(f for f in files + extra if f.is_file())


def _load_mnist(device: Any = "cpu", dtype: Any = None) -> BundledModel:
    import torch

    from diffsample.testbed import mnist

    return BundledModel(unet=mnist.load_unet(device=device, dtype=dtype or torch.float32),
                        scheduler_config=mnist.load_scheduler_config(),
                        classifier=mnist.load_noisy_classifier(device=device),
                        clean_classifier=mnist.load_classifier(device=device),
                        weight_files=_mnist_files(), metrics=("mnist-fd",))


def _mnist_scores(samples: Any, classes: Sequence[int] | None) -> dict[str, float]:
    import torch

    from diffsample.testbed import mnist

    x = samples.clamp(-1, 1)
    out = {"mnist_fd": mnist.mnist_fd(x)}
    if classes is not None:
        out["class_accuracy"] = mnist.class_accuracy(x, torch.as_tensor(classes))
    return out


def _load_student(name: str, device: Any = "cpu", dtype: Any = None) -> BundledModel:
    import torch

    from diffsample.testbed import mnist
    from diffsample.testbed.mnist.students import STUDENTS, load_student_unets

    unets = load_student_unets(name, device=device, dtype=dtype or torch.float32)
    info = STUDENTS[name]
    files = (info.path, mnist.MODEL_DIR / "unet" / "config.json", mnist.MODEL_DIR / "scheduler" / "scheduler_config.json",
             mnist.WEIGHTS_DIR / "classifier.safetensors", mnist.WEIGHTS_DIR / "noisy_classifier.safetensors")
    return BundledModel(unet=unets[0], scheduler_config={**mnist.load_scheduler_config(), "prediction_type": "v_prediction"},
                        classifier=mnist.load_noisy_classifier(device=device),
                        clean_classifier=mnist.load_classifier(device=device),
                        weight_files=tuple(f for f in files if f.is_file()), metrics=("mnist-fd",),
                        grid=info.grid, step_unets=tuple(unets) if len(unets) > 1 else ())


def _student_loader(name: str) -> Callable[..., BundledModel]:
    def load(device: Any = "cpu", dtype: Any = None) -> BundledModel:
        return _load_student(name, device, dtype)

    load.__name__ = f"load_{name.replace('-', '_')}"
    return load


_STUDENT_CFG = ("off by default, as distilled (CFG scale 1); --cfg-scale w applies CFG to the student's own "
                "predictions (trained with the teacher's 15 % label dropout; 2 model evaluations per step)")
_STUDENTS = {
    "mnist-pd-4": ModelInfo("4-step progressive-distillation student of mnist (arXiv 2202.00512), v-prediction",
                            "ddim", "trailing", 4, _STUDENT_CFG),
    "mnist-pd-2": ModelInfo("2-step progressive-distillation student of mnist, shared weights", "ddim", "trailing", 2,
                            _STUDENT_CFG),
    "mnist-decoupled-2": ModelInfo("2-step student of mnist with one network per step (step-decoupled, "
                                   "arXiv 2606.12575)", "ddim", "trailing", 2, _STUDENT_CFG),
    "mnist-mfd-1": ModelInfo("1-step student of mnist: mean velocity over [0, T] of a 2-step sampler "
                             "(single-interval reduction of arXiv 2606.11155)", "ddim", "trailing", 1, _STUDENT_CFG),
}

BUNDLED_MODELS: dict[str, Callable[..., BundledModel]] = {"mnist": _load_mnist,
                                                          **{name: _student_loader(name) for name in _STUDENTS}}
"""Bundled models: name -> loader ``(device, dtype) -> BundledModel``."""
BUNDLED_INFO: dict[str, ModelInfo] = {
    "mnist": ModelInfo("class-conditional 16x16 MNIST UNet (1.11 M params, eps-prediction, DDPM linear betas, "
                       "1,000 steps)"),
    **_STUDENTS,
}
"""Bundled models: name -> :class:`ModelInfo` (summary, default sampler, CFG policy)."""
DEFAULT_MODEL = "mnist"
"""The bundled model loaded when none is named."""

METRICS: dict[str, Metric] = {
    "mnist-fd": Metric(_mnist_scores, headline="mnist_fd", needs="the bundled MNIST model",
                       summary="Frechet distance in the MNIST classifier's 64-d features to 1,000 held-out digits, "
                               "plus class accuracy"),
}
"""Sample-quality metrics: name -> :class:`Metric`."""
DEFAULT_METRIC = "mnist-fd"
"""The metric a sweep scores with unless told otherwise."""

__all__ = ["BUNDLED_INFO", "BUNDLED_MODELS", "BundledModel", "DEFAULT_METRIC", "DEFAULT_MODEL", "METRICS", "Metric",
           "ModelInfo"]
