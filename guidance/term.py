"""Guidance-layer types: conditioning, the conditional denoiser, and a guidance term.

A guidance term maps a :class:`Denoiser` to a :class:`Denoiser` (DESIGN.md section 2.1, principle
5), so every term works with every solver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from diffsample.solvers.solver import NoiseSchedule


@dataclass(frozen=True)
class Cond:
    """Conditioning handed to a denoiser.

    Attributes:
        positive: model keyword arguments of the conditional branch (e.g. ``class_labels`` of shape
            ``(B,)``, ``encoder_hidden_states``).
        negative: keyword arguments of the unconditional / negative branch, or ``None``.
    """

    positive: Mapping[str, Any] = field(default_factory=dict)
    negative: Mapping[str, Any] | None = None

    def map(self, fn: Callable[[Any], Any]) -> "Cond":
        """A copy with ``fn`` applied to every keyword value of both branches (e.g. selecting or
        repeating the rows of batch-first tensors)."""
        return Cond({k: fn(v) for k, v in self.positive.items()},
                    None if self.negative is None else {k: fn(v) for k, v in self.negative.items()})


@runtime_checkable
class Denoiser(Protocol):
    """``(x, t, cond) -> denoised``: ``x`` is ``(B, *dims)`` in native space, ``t`` is ``(B,)`` in
    ``noise_schedule`` time; returns the data prediction with the shape of ``x``."""

    noise_schedule: NoiseSchedule

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor: ...


class Guidance(Protocol):
    """A guidance term: wraps a denoiser into a guided denoiser."""

    def __call__(self, denoiser: Denoiser) -> Denoiser: ...


@dataclass(frozen=True)
class Resources:
    """What a model offers to guidance terms built from the registry (``GUIDANCE.create(spec,
    resources=...)``); a term that needs a missing resource raises a ``ValueError`` naming it.

    Attributes:
        classifier: noise-aware classifier ``(x_t, t) -> logits (B, num_classes)``, ``t`` in the
            model's noise-schedule time (e.g. the bundled MNIST ``NoisyDigitClassifier``).
        clean_classifier: classifier on clean samples ``x0 -> logits`` (Tweedie plug-in).
        num_classes: number of classes of a class-conditional model, or ``None``.
        conditional: whether the denoiser accepts a condition with a negative (null) branch.
        decode: latent -> sample decoder for rewards on decoded samples, or ``None``.
    """

    classifier: Any = None
    clean_classifier: Any = None
    num_classes: int | None = None
    conditional: bool = False
    decode: Any = None
