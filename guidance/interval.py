"""Guidance interval: apply a guidance term only inside a window of VE noise levels."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffsample.guidance._common import sigma_ve
from diffsample.guidance.loop_hooks import LoopHooks
from diffsample.guidance.term import Cond, Denoiser, Guidance


@dataclass(frozen=True)
class Interval:
    """Apply ``term`` only where the VE noise level ``sigma_ve = sigma / alpha`` of ``t`` lies in
    ``(sigma_lo, sigma_hi]`` (Kynkäänniemi et al. 2024, arXiv 2404.07724, eq. 3; EDM2-XXL uses
    ``(0.28, 5.42]``); elsewhere the unguided denoiser is called with one branch: ``base =
    "conditional"`` (CFG family) uses ``cond.positive``; ``"unconditional"`` (classifier / Jeffrey
    guidance of the unconditional branch) uses ``cond.negative`` when there is one. ``cond=None``
    is passed on as is.

    Rows of one batch at different ``t`` are split between the two denoisers.

    Raises:
        ValueError: ``sigma_lo < 0``, ``sigma_hi <= sigma_lo`` or an unknown ``base``.
    """

    term: Guidance
    sigma_lo: float = 0.0
    sigma_hi: float = math.inf
    base: str = "conditional"

    calls_model_branches: ClassVar[bool] = True  # outside the window it calls one model branch itself

    @property
    def sets_cfg_scale(self) -> bool:
        """Whether the windowed term is of the CFG family."""
        return bool(getattr(self.term, "sets_cfg_scale", False))

    def __post_init__(self) -> None:
        if self.base not in ("conditional", "unconditional"):
            raise ValueError(f"unknown interval base {self.base!r}; valid: conditional, unconditional")
        if not (self.sigma_lo >= 0 and self.sigma_hi > self.sigma_lo):
            raise ValueError(f"guidance interval needs 0 <= sigma_lo < sigma_hi, got ({self.sigma_lo}, {self.sigma_hi}]")

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return _IntervalDenoiser(denoiser, self.term(denoiser), self.sigma_lo, self.sigma_hi, self.base)


def within(term: Guidance, sigma_lo: float = 0.0, sigma_hi: float = math.inf, base: str = "conditional") -> Guidance:
    """``term`` restricted to ``sigma_ve`` in ``(sigma_lo, sigma_hi]``; ``term`` itself when the
    window is everything (``0, inf``)."""
    if sigma_lo == 0.0 and sigma_hi == math.inf:
        return term
    return Interval(term, sigma_lo, sigma_hi, base)


def windowed_term(term: Guidance) -> Guidance:
    """The term an :class:`Interval` restricts (through nested windows); ``term`` itself otherwise."""
    while isinstance(term, Interval):
        term = term.term
    return term


def with_windowed_term(term: Guidance, new: Guidance) -> Guidance:
    """``term`` with the term it restricts replaced by ``new``, its window(s) kept; ``new`` when
    ``term`` is no :class:`Interval` (the inverse of :func:`windowed_term`)."""
    if isinstance(term, Interval):
        return replace(term, term=with_windowed_term(term.term, new))
    return new


class _IntervalDenoiser:
    """The guided denoiser inside the sigma window, the plain one outside (a chain node)."""

    def __init__(self, inner: Denoiser, guided: Denoiser, lo: float, hi: float, base: str) -> None:
        self.inner, self.guided, self.lo, self.hi, self.base = inner, guided, lo, hi, base
        self.noise_schedule = inner.noise_schedule
        self.label = f"interval({lo:g}, {hi:g}]"

    def wrapped(self) -> tuple[Denoiser, ...]:
        return (self.guided, self.inner)

    def loop_hooks(self) -> LoopHooks:
        return LoopHooks()

    def _plain(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        if cond is None:
            return self.inner(x, t, None)
        if self.base == "unconditional" and cond.negative is not None:
            return self.inner(x, t, Cond(cond.negative))
        return self.inner(x, t, Cond(cond.positive))

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        s = sigma_ve(self.noise_schedule, t, x.shape[0])
        inside = (s > self.lo) & (s <= self.hi)
        if bool(inside.all()):
            return self.guided(x, t, cond)
        if not bool(inside.any()):
            return self._plain(x, t, cond)
        idx_in = inside.nonzero().flatten().to(x.device)
        idx_out = (~inside).nonzero().flatten().to(x.device)
        tt = torch.as_tensor(t)
        out = torch.empty_like(x)
        out[idx_in] = self.guided(x[idx_in], _rows(tt, idx_in), _sub(cond, idx_in, x.shape[0]))
        out[idx_out] = self._plain(x[idx_out], _rows(tt, idx_out), _sub(cond, idx_out, x.shape[0]))
        return out


def _rows(t: Tensor, idx: Tensor) -> Tensor:
    return t[idx] if t.ndim else t


def _take(v: Any, idx: Tensor, b: int) -> Any:
    return v[idx] if isinstance(v, Tensor) and v.ndim and v.shape[0] == b else v


def _sub(cond: Cond | None, idx: Tensor, b: int) -> Cond | None:
    return None if cond is None else cond.map(lambda v: _take(v, idx, b))
