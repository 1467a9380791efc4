"""Classifier guidance (noise-aware classifier, or a clean classifier through the Tweedie
estimate) as a denoiser wrapper, and the shared gradient machinery used by Jeffrey guidance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from diffsample.core.accounting import add_backward_evals, forward_rows, measure_model_evals

from diffsample.guidance._common import GuidedDenoiser, alpha_sigma, class_log_prob, target_labels
from diffsample.guidance.term import Cond, Denoiser

ESTIMATORS = ("noisy", "tweedie")
BASES = ("unconditional", "conditional")

LogG = Callable[[Tensor], Tensor]
"""``logits (B, K) -> log G (B,)``: the log of the guidance potential given classifier logits."""


def check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def base_cond(cond: Cond | None, base: str) -> Cond | None:
    """The branch a classifier-type term guides: ``cond.negative`` (the unconditional model) for
    ``base="unconditional"`` when there is one, else ``cond.positive``; ``None`` stays ``None``."""
    if cond is None:
        return None
    if base == "unconditional" and cond.negative is not None:
        return Cond(cond.negative)
    return Cond(cond.positive)


def guided_denoised(inner: Denoiser, x: Tensor, t: Tensor, cond: Cond | None, log_g: LogG, *,
                    estimator: str, classifier: Any, clean_classifier: Any, scale: float) -> tuple[Tensor, Tensor]:
    """``(denoised + scale sigma^2 / alpha grad_x log G, grad_x log G)``.

    The score of the guided model is ``grad log p_t(x) + scale grad log G_t(x)``; as a data
    prediction this is ``D + scale sigma^2 / alpha grad log G`` (``score = (alpha D - x) / sigma^2``).
    ``estimator="noisy"``: ``G`` is evaluated on ``classifier(x_t, t)`` (no gradient through the
    denoiser). ``"tweedie"``: on ``clean_classifier(D(x_t))``, differentiated through the denoiser
    (one VJP, recorded as 2 model evaluations per network row of the forward call, so 4 per sample under CFG).
    """
    parts = guided_parts(inner, x, t, cond, log_g, estimator=estimator, classifier=classifier,
                         clean_classifier=clean_classifier)
    a, s = alpha_sigma(inner.noise_schedule, t, x)
    return parts.denoised + scale * (s**2 / a) * parts.grad, parts.grad


class GuidedParts(NamedTuple):
    """The pieces of a classifier-type guidance evaluation at ``x_t`` (all ``(B, ...)``, detached).

    Attributes:
        denoised: the base denoiser's data prediction ``D(x_t)``.
        grad: ``grad_x log G_t(x_t)`` in score units.
        log_g: ``log G_t(x_t)``, shape ``(B,)`` (the twist of twisted SMC, :mod:`diffsample.samplers.twisted_smc`).
    """

    denoised: Tensor
    grad: Tensor
    log_g: Tensor


def guided_parts(inner: Denoiser, x: Tensor, t: Tensor, cond: Cond | None, log_g: LogG, *,
                 estimator: str, classifier: Any, clean_classifier: Any) -> GuidedParts:
    """``D(x_t)``, ``grad_x log G`` and ``log G`` of :func:`guided_denoised` (same estimators and accounting)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        if estimator == "noisy":
            with torch.no_grad():
                denoised = inner(x, t, cond)
            logits = classifier(xg, t)
        else:
            with measure_model_evals() as rows:
                denoised = inner(xg, t, cond)
            logits = clean_classifier(denoised)
        lg = log_g(logits.to(torch.float64) if x.dtype == torch.float64 else logits)
        (grad,) = torch.autograd.grad(lg.sum(), xg)
    if estimator != "noisy":
        add_backward_evals(forward_rows(rows))  # one VJP through exactly the network rows of the forward call
    return GuidedParts(denoised.detach(), grad.detach().to(x.dtype), lg.detach())


@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233, Alg. 1 / eq. 10-11):
    ``grad log p_t(x) + scale grad log p_t(y | x_t)``, as ``denoised + scale sigma^2/alpha grad``.

    Args:
        classifier: noise-aware classifier ``(x_t (B, *dims), t (B,)) -> logits (B, K)``, ``t`` in
            the denoiser's noise-schedule time (``estimator="noisy"``, default).
        clean_classifier: ``x0 -> logits`` used on the Tweedie estimate ``D(x_t)``
            (``estimator="tweedie"``, DPS-style; costs one VJP through the denoiser per call).
        scale: guidance scale (1 = the exact conditional ``p(x | y)`` with an exact classifier).
        label: fixed target class; ``None`` reads per-row labels ``cond.positive[label_key]``.
        base: ``"unconditional"`` guides the unconditional branch (``cond.negative``) of a
            conditional model; ``"conditional"`` guides ``cond.positive``.

    Raises:
        ValueError: unknown estimator / base, the classifier the estimator needs is missing,
            ``scale < 0``; at call time, no label given and none in ``cond``.
    """

    calls_model_branches: ClassVar[bool] = True  # picks the model's branches itself

    classifier: Any = None
    clean_classifier: Any = None
    scale: float = 1.0
    label: int | None = None
    label_key: str = "class_labels"
    estimator: str = "noisy"
    base: str = "unconditional"

    def __post_init__(self) -> None:
        check_choice(self.estimator, ESTIMATORS, "classifier-guidance estimator")
        check_choice(self.base, BASES, "classifier-guidance base")
        if self.estimator == "noisy" and self.classifier is None:
            raise ValueError("classifier guidance with estimator='noisy' needs a noise-aware classifier (x_t, t) -> logits")
        if self.estimator == "tweedie" and self.clean_classifier is None:
            raise ValueError("classifier guidance with estimator='tweedie' needs a clean classifier x0 -> logits")
        if not self.scale >= 0:
            raise ValueError(f"classifier-guidance scale must be >= 0, got {self.scale}")

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return _ClassifierDenoiser(denoiser, self)


class _ClassifierDenoiser(GuidedDenoiser):
    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        term = self.term
        y = target_labels(x, cond, term.label, term.label_key, "classifier guidance")

        def log_g(logits: Tensor) -> Tensor:
            return class_log_prob(logits, y, "classifier guidance")

        out, _ = guided_denoised(self.inner, x, t, base_cond(cond, term.base), log_g, estimator=term.estimator,
                                 classifier=term.classifier, clean_classifier=term.clean_classifier,
                                 scale=term.scale)
        return out
