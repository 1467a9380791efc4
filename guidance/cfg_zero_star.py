"""CFG-Zero* (optimised scale and zero-init) as a denoiser wrapper."""

from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

import torch
from torch import Tensor

from diffsample.guidance._common import GuidedDenoiser, RunState, alpha_sigma, call_both, check_space, from_space, row_dot, to_space
from diffsample.guidance.term import Cond, Denoiser


@dataclass(frozen=True)
class CFGZeroStar:
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886, eqs. 9-11 and sec. 3.3 zero-init).

    In prediction space ``space`` (``"flow"``: the velocity ``u = eps - x0`` the paper uses,
    default; ``"eps"``; ``"x0"``), per sample ``s* = <p_c, p_u> / ||p_u||^2`` and
    ``p = s* p_u + scale (p_c - s* p_u)``. With ``zero_init_steps = k > 0`` the prediction is set to
    zero on the first ``k`` noise levels of a run (for the flow space: the state is held still).

    State: a counter of distinct noise levels, reset when ``t`` increases (a new run).
    2 model evaluations per call (zero-init calls still evaluate nothing: 0).

    Raises:
        ValueError: ``scale < 0``, ``zero_init_steps < 0``, unknown ``space``; at call time, a
            ``cond`` without a negative branch.
    """

    sets_cfg_scale: ClassVar[bool] = True  # a CFG-family term (docs/design.md: composition)
    calls_model_branches: ClassVar[bool] = True

    scale: float = 4.0
    zero_init_steps: int = 0
    space: str = "flow"

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"CFG-Zero* scale must be >= 0, got {self.scale}")
        if not (isinstance(self.zero_init_steps, int) and self.zero_init_steps >= 0):
            raise ValueError(f"CFG-Zero* zero_init_steps must be an integer >= 0, got {self.zero_init_steps!r}")
        check_space(self.space, "CFG-Zero*")

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return _CFGZeroStarDenoiser(denoiser, self)


class _CFGZeroStarDenoiser(GuidedDenoiser):
    def __init__(self, inner: Denoiser, term: CFGZeroStar) -> None:
        super().__init__(inner, term)
        self.state = RunState()

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        term = self.term
        self.state.update(t)
        a, s = alpha_sigma(self.noise_schedule, t, x)
        if self.state.step < term.zero_init_steps:
            if cond is None or cond.negative is None:
                raise ValueError("CFG-Zero* needs a conditional model and a cond with a negative (unconditional) branch")
            return from_space(torch.zeros_like(x), x, a, s, term.space)
        d_pos, d_neg = call_both(self.inner, x, t, cond, "CFG-Zero*")
        p_c, p_u = to_space(d_pos, x, a, s, term.space), to_space(d_neg, x, a, s, term.space)
        s_star = row_dot(p_c, p_u) / row_dot(p_u, p_u).clamp_min(1e-30)
        p = s_star * p_u + term.scale * (p_c - s_star * p_u)
        return from_space(p, x, a, s, term.space)
