"""Real testbeds shipped with diffsample: the exact Gaussian mixture (:mod:`.gmm`) and the bundled
MNIST model (:mod:`.mnist`).

The layers above find the bundled models and their quality metrics here, by name, without naming
any of them:

* :data:`BUNDLED_MODELS` -- name -> loader ``(device, dtype) -> BundledModel`` (the network, its
  scheduler config, classifiers, the files that determine it, the metrics that fit its samples);
  :data:`DEFAULT_MODEL` is the one loaded when no model is named.
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
    """

    unet: Any
    scheduler_config: dict
    classifier: Any = None
    clean_classifier: Any = None
    weight_files: tuple[Path, ...] = ()
    metrics: tuple[str, ...] = ()


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


BUNDLED_MODELS: dict[str, Callable[..., BundledModel]] = {"mnist": _load_mnist}
"""Bundled models: name -> loader ``(device, dtype) -> BundledModel``."""
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

__all__ = ["BUNDLED_MODELS", "BundledModel", "DEFAULT_METRIC", "DEFAULT_MODEL", "METRICS", "Metric"]
