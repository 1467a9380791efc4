"""MNIST-FD: Fréchet distance in the clean :class:`DigitClassifier`'s 64-d penultimate features.

Computed with ``torchmetrics.image.fid.FrechetInceptionDistance`` given the feature CNN as a custom
module (no Inception, no torch-fidelity, no download); statistics are accumulated in float64.

FD is strongly biased by the sample count: compare numbers only at equal N. On this testbed,
real-vs-real (1,000 train digits vs the 1,000 held-out digits) is ≈ 2.8; at N = 1,000 the seed
noise is about ±0.5–1 FD.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = ["mnist_fd", "class_accuracy", "FDFeatures"]

_BATCH = 500


class FDFeatures(nn.Module):
    """The clean classifier's 64-d penultimate features as a torchmetrics feature module.

    ``forward(x)``: (B, 1, 16, 16) in [-1, 1] → (B, 64) float64.
    """

    num_features = 64

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x.to(torch.float32)).to(torch.float64)


@functools.lru_cache(maxsize=1)
def _classifier():
    from diffsample.testbed.mnist.loaders import load_classifier

    return load_classifier()


def _check(samples: Tensor, name: str) -> Tensor:
    if not isinstance(samples, Tensor) or samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 16, 16):
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, 1, 16, 16), got {shape}")
    if samples.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images for a covariance, got {samples.shape[0]}")
    x = samples.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x.clamp(-1.0, 1.0)


def mnist_fd(samples: Tensor, reference: Tensor | None = None) -> float:
    """Fréchet distance between ``samples`` and ``reference`` in the clean classifier's features.

    Args:
        samples: generated images, (N, 1, 16, 16), values in [-1, 1] (values outside are clamped,
            as when writing an image).
        reference: real images, (M, 1, 16, 16) in [-1, 1]; defaults to the 1,000 bundled held-out
            digits (``load_digits("heldout")``).

    Returns:
        The FD as a Python float (≥ 0 up to rounding; ≈ 2.8 for 1,000 real train digits vs the
        held-out digits, ≈ 800 for uniform noise). Biased by N: compare at equal N only.

    Raises:
        ValueError: wrong shape, fewer than 2 images, or non-finite values.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if reference is None:
        from diffsample.testbed.mnist.data import load_digits

        reference, _ = load_digits("heldout")
    x = _check(samples, "samples")
    ref = _check(reference, "reference")
    metric = FrechetInceptionDistance(feature=FDFeatures(_classifier()), normalize=False,
                                      sync_on_compute=False)  # local tensors: never sync across processes
    with torch.no_grad():
        for i in range(0, len(ref), _BATCH):
            metric.update(ref[i : i + _BATCH], real=True)
        for i in range(0, len(x), _BATCH):
            metric.update(x[i : i + _BATCH], real=False)
        return float(metric.compute())


def class_accuracy(samples: Tensor, labels: Tensor) -> float:
    """Fraction of ``samples`` that the clean classifier assigns to the requested ``labels``.

    Args:
        samples: (N, 1, 16, 16) in [-1, 1] (clamped).
        labels: (N,) integer classes 0..9.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: wrong shapes or label values.
    """
    x = _check(samples, "samples")
    labels = torch.as_tensor(labels).to("cpu", torch.int64).reshape(-1)
    if len(labels) != len(x):
        raise ValueError(f"got {len(x)} samples but {len(labels)} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("labels must be in 0..9")
    clf = _classifier()
    with torch.no_grad():
        preds = torch.cat([clf(x[i : i + _BATCH]).argmax(1) for i in range(0, len(x), _BATCH)])
    return float((preds == labels).float().mean())
