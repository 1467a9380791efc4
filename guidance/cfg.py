"""Classifier-free guidance as a denoiser wrapper."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Cond, Denoiser


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598):
    ``denoised = d_neg + scale (d_pos - d_neg)``, applied to the data prediction (equivalent to
    guiding eps or v, since each is affine in ``denoised`` at fixed ``x, t``).

    ``scale = 1`` returns the conditional denoiser unchanged (one call); otherwise each call
    evaluates both branches (two calls: ``model_evals`` doubles). Needs ``cond.negative``.

    Raises:
        ValueError: ``scale < 0``; at call time, a ``cond`` without a negative branch.
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"CFG scale must be >= 0, got {self.scale}")

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return _CFGDenoiser(denoiser, self.scale)


class _CFGDenoiser:
    def __init__(self, inner: Denoiser, scale: float) -> None:
        self.inner = inner
        self.scale = scale
        self.noise_schedule = inner.noise_schedule

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.negative is None:
            raise ValueError("CFG needs a conditional model and a cond with a negative (unconditional) branch")
        d_pos = self.inner(x, t, cond)
        if self.scale == 1.0:
            return d_pos
        d_neg = self.inner(x, t, Cond(cond.negative))
        return d_neg + self.scale * (d_pos - d_neg)
