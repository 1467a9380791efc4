"""Adaptive projected guidance (APG) as a denoiser wrapper."""

from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import dataclass

from torch import Tensor

from diffsample.guidance._common import GuidedDenoiser, RunState, alpha_sigma, call_both, check_space, from_space, row_dot, row_norm, to_space
from diffsample.guidance.term import Cond, Denoiser


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416, Alg. 1 / eqs. 8-13).

    In prediction space ``space`` (``"x0"``: the paper's denoised space, default; ``"eps"`` or
    ``"flow"``: diffusers' ``AdaptiveProjectedGuidance`` applies it to the raw prediction), with
    ``p_c, p_u`` the conditional / unconditional predictions, per sample:

    * ``delta = p_c - p_u``; momentum ``delta <- delta + momentum * delta_prev`` (running average
      over the run; the paper recommends ``momentum < 0``, e.g. -0.5);
    * norm threshold ``delta <- delta min(1, norm_threshold / ||delta||)`` (``inf`` = off);
    * ``delta_par = (<delta, p_c> / ||p_c||^2) p_c``, ``delta_perp = delta - delta_par``;
    * ``p = p_c + (scale - 1) (delta_perp + eta delta_par)``.

    ``eta = 1``, ``momentum = 0``, ``norm_threshold = inf`` is exactly CFG. The momentum buffer is
    the only state; it resets when ``t`` increases (a new run). 2 model evaluations per call.

    Raises:
        ValueError: ``scale < 0``, ``norm_threshold <= 0``, unknown ``space``; at call time, a
            ``cond`` without a negative branch.
    """

    sets_cfg_scale: ClassVar[bool] = True  # a CFG-family term (docs/design.md: composition)
    calls_model_branches: ClassVar[bool] = True

    scale: float = 7.5
    eta: float = 0.0
    momentum: float = -0.5
    norm_threshold: float = 15.0
    space: str = "x0"

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"APG scale must be >= 0, got {self.scale}")
        if not self.norm_threshold > 0:
            raise ValueError(f"APG norm_threshold must be > 0 (inf disables it), got {self.norm_threshold}")
        check_space(self.space, "APG")

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return _APGDenoiser(denoiser, self)


class _APGDenoiser(GuidedDenoiser):
    def __init__(self, inner: Denoiser, term: APG) -> None:
        super().__init__(inner, term)
        self.state = RunState()

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        term = self.term
        d_pos, d_neg = call_both(self.inner, x, t, cond, "APG")
        a, s = alpha_sigma(self.noise_schedule, t, x)
        p_c = to_space(d_pos, x, a, s, term.space)
        delta = p_c - to_space(d_neg, x, a, s, term.space)
        self.state.update(t)
        if term.momentum != 0.0:
            prev = self.state.data.get("running")
            if prev is not None and prev.shape == delta.shape:
                delta = delta + term.momentum * prev
            self.state.data["running"] = delta
        if math.isfinite(term.norm_threshold):
            delta = delta * (term.norm_threshold / row_norm(delta).clamp_min(1e-30)).clamp(max=1.0)
        par = row_dot(delta, p_c) / row_dot(p_c, p_c).clamp_min(1e-30) * p_c
        perp = delta - par
        p = p_c + (term.scale - 1.0) * (perp + term.eta * par)
        return from_space(p, x, a, s, term.space)
