"""Guidance-layer types: conditioning, the conditional denoiser, and a guidance term.

A guidance term maps a :class:`Denoiser` to a :class:`Denoiser` (docs/design.md#guidance-term),
so every term works with every solver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass(frozen=True)
class UnguidedSamples:
    """Samples of the run's sampler without the term being prepared (:attr:`PrepareContext.sample_unguided`).

    Attributes:
        x: ``(N, *sample_shape)`` final samples in model space.
        model_evals: network passes summed over the ``N`` samples, in forward-equivalents.
        nfe: denoiser calls per sample.
    """

    x: Tensor
    model_evals: float
    nfe: int


@dataclass(frozen=True)
class PrepareContext:
    """What a run offers a guidance term's preparation step (:class:`Preparable`), built by the
    run layer (:func:`diffsample.run.prepare.prepare_context`) for one term at a time.

    Attributes:
        denoiser: the chain below the term: the model's denoiser wrapped by the terms applied before it.
        below: the specs of those terms, in order (for cache keys).
        sample_unguided: ``(denoiser, seeds, cond_fn) -> UnguidedSamples``: one sample per seed
            (per-sample noise, so the result does not depend on the batch size) with the run's
            sampler on ``denoiser``; ``cond_fn(b)`` gives the condition of a batch of ``b`` rows.
        noise: ``seeds -> (len(seeds), *sample_shape)`` standard normal draws, one per seed, on the
            model's device.
        model_cond: the model's conditioning for class labels ``(B,)`` (``None`` for an
            unconditional model); raises ``ValueError`` for labels it cannot take.
        num_classes: classes of a class-conditional model, else ``None``.
        model: the model's name (a bundled name or a folder).
        weight_files: the files whose content determines the model and its classifiers (empty when
            unknown, e.g. a model built in code).
        dtype: the network's dtype without the ``torch.`` prefix (``"float32"``).
        sampler: the sampler as strings and numbers: ``solver``, ``step_schedule`` (reprs),
            ``steps``, ``final``.
        batch_size: rows per network batch.
        progress: whether the run shows progress bars.
        report: sink for run-record entries ``{field: value}``; the run records them under
            ``record[field]`` (a list when several terms report the same field).
    """

    denoiser: Denoiser
    below: tuple[str, ...]
    sample_unguided: Callable[[Denoiser, Sequence[int], Callable[[int], Cond | None]], UnguidedSamples]
    noise: Callable[[Sequence[int]], Tensor]
    model_cond: Callable[[Tensor | None], Cond | None]
    num_classes: int | None
    model: str
    weight_files: tuple[Path, ...] = ()
    dtype: str = "float32"
    sampler: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    progress: bool = False
    report: Callable[[Mapping[str, Any]], None] = lambda entries: None


@runtime_checkable
class Preparable(Protocol):
    """A guidance term with a preparation step: before sampling, the run calls ``prepare(context)``
    on it (inside a guidance window too) and applies the term it returns instead (e.g. Jeffrey
    guidance estimates the model marginal it divides by). ``prepare`` may sample with
    ``context.sample_unguided`` and report what it did with ``context.report``; it raises
    ``ValueError`` for settings it cannot prepare."""

    def prepare(self, context: PrepareContext) -> Guidance: ...
