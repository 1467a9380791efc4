"""Classifier-free guidance (with optional CFG-rescale) as a denoiser wrapper."""

from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

from torch import Tensor

from diffsample.guidance._common import GuidedDenoiser, alpha_sigma, call_both, check_space, from_space, row_norm, to_space
from diffsample.guidance.term import Cond, Denoiser


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598, eq. 6):
    ``denoised = d_neg + scale (d_pos - d_neg)``, applied to the data prediction (equivalent to
    guiding eps or v, since each is affine in ``denoised`` at fixed ``x, t``).

    With ``rescale = phi > 0`` this is CFG-rescale (Lin et al. 2023, arXiv 2305.08891, sec. 3.4,
    eqs. 15-17): in prediction space ``space`` (``"eps"``, as diffusers' ``rescale_noise_cfg``;
    ``"x0"``; ``"flow"`` = ``eps - x0``) the guided prediction ``p_cfg`` is rescaled to the per-sample
    standard deviation of the conditional one, ``p_res = p_cfg std(p_pos) / std(p_cfg)`` (std over
    all non-batch dims), and mixed: ``p = phi p_res + (1 - phi) p_cfg``. ``phi = 0`` is plain CFG.

    ``scale = 1`` (and any ``rescale``) returns the conditional denoiser unchanged (one call);
    otherwise each call evaluates both branches in one doubled batch (``model_evals`` doubles).
    ``x`` is ``(B, *dims)``, ``t`` is ``(B,)`` in the denoiser's noise-schedule time.

    Raises:
        ValueError: ``scale < 0``, ``rescale`` outside ``[0, 1]``, unknown ``space``; at call time,
            a ``cond`` without a negative branch.
    """

    sets_cfg_scale: ClassVar[bool] = True  # a CFG-family term (docs/design.md: composition)
    calls_model_branches: ClassVar[bool] = True

    scale: float = 1.0
    rescale: float = 0.0
    space: str = "eps"

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"CFG scale must be >= 0, got {self.scale}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"CFG rescale (phi) must be in [0, 1], got {self.rescale}")
        check_space(self.space, "CFG")

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return _CFGDenoiser(denoiser, self)


def cfg_combine(d_pos: Tensor, d_neg: Tensor, scale: float) -> Tensor:
    """``d_neg + scale (d_pos - d_neg)``."""
    return d_neg + scale * (d_pos - d_neg)


class _CFGDenoiser(GuidedDenoiser):
    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.negative is None:
            raise ValueError("CFG needs a conditional model and a cond with a negative (unconditional) branch")
        if self.term.scale == 1.0:
            return self.inner(x, t, Cond(cond.positive))
        d_pos, d_neg = call_both(self.inner, x, t, cond, "CFG")
        guided = cfg_combine(d_pos, d_neg, self.term.scale)
        phi = self.term.rescale
        if phi == 0.0:
            return guided
        a, s = alpha_sigma(self.noise_schedule, t, x)
        p_pos = to_space(d_pos, x, a, s, self.term.space)
        p_cfg = to_space(guided, x, a, s, self.term.space)
        std_pos = row_norm(p_pos - p_pos.mean(dim=tuple(range(1, x.ndim)), keepdim=True))
        std_cfg = row_norm(p_cfg - p_cfg.mean(dim=tuple(range(1, x.ndim)), keepdim=True))
        p = phi * p_cfg * (std_pos / std_cfg) + (1.0 - phi) * p_cfg
        return from_space(p, x, a, s, self.term.space)
