"""CFG++ as an exact denoiser wrapper for first-order (Euler / DDIM) sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffsample.solvers.numerics import ancestral_split
from diffsample.solvers.solver import Grid

from diffsample.guidance._common import call_both
from diffsample.guidance.loop_hooks import LoopHooks
from diffsample.guidance.term import Cond, Denoiser


@dataclass(frozen=True)
class CFGPlusPlus:
    r"""CFG++ (Chung et al. 2024, arXiv 2406.08070, Alg. 1 / eq. 11) for the Euler / DDIM solver.

    CFG++ takes the guided data prediction ``x0_l = d_u + scale (d_c - d_u)`` (``scale`` in
    ``[0, 1]``, the paper's lambda) but re-noises along the *unconditional* noise ``eps_u``:
    ``x_s = alpha_s x0_l + sigma_s' eps_u (+ DDIM-eta noise)``. At fixed ``x, t`` and a known next
    level this equals an ordinary Euler/DDIM step on the modified prediction

    ``D' = d_u + (x0_l - d_u) / (1 - r)``,  ``r = s_down / s``

    where ``s = sigma / alpha`` and ``s_down`` is the deterministic part of the step to the next
    grid point (``r = exp(-h)``, ``h = lambda_next - lambda`` for ``eta = 0``; ``r = 0`` on the
    step to ``sigma = 0``, where ``D' = x0_l``). Proof: Euler gives
    ``x_next / alpha_next = D' + r (x / alpha - D')`` and CFG++ gives ``x0_l + r (x / alpha - d_u)``.

    So the wrapper needs the grid: pass ``grid`` (a :class:`~diffsample.solvers.solver.Grid`) or
    ``sampler`` (anything with ``.solver`` and ``.grid(noise_schedule)``, e.g. a ``Sampler``); the
    solver must be first order (``Euler`` / ``ddim`` / ``euler_ancestral``, whose ``eta`` is used).
    With other solvers CFG++ has no exact denoiser form and is refused. 2 model evaluations per call.

    Raises:
        ValueError: ``scale`` outside ``[0, 2]`` (the paper uses ``[0, 1]``), a non-first-order
            solver; at call time, no grid, a ``t`` not on the grid, or a cond without negative branch.
    """

    sets_cfg_scale: ClassVar[bool] = True  # a CFG-family term (docs/design.md: composition)
    calls_model_branches: ClassVar[bool] = True

    scale: float = 0.6
    grid: Grid | None = None
    sampler: Any = None
    eta: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale <= 2.0:
            raise ValueError(f"CFG++ scale (lambda) must be in [0, 2] (paper: [0, 1]), got {self.scale}")
        if self.sampler is not None:
            solver = getattr(self.sampler, "solver", None)
            if getattr(solver, "order", None) != 1 or not hasattr(solver, "eta"):
                raise ValueError(f"CFG++ is exact only with the first-order Euler/DDIM solver; got {solver!r}")
            object.__setattr__(self, "eta", float(solver.eta))

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        grid = self.grid
        if grid is None and self.sampler is not None:
            grid = self.sampler.grid(denoiser.noise_schedule)
        return _CFGPPDenoiser(denoiser, self.scale, grid, self.eta)


class _CFGPPDenoiser:
    """CFG++'s guided denoiser on its grid (a chain node without loop hooks)."""

    label = "cfgpp"

    def __init__(self, inner: Denoiser, scale: float, grid: Grid | None, eta: float) -> None:
        self.inner, self.scale, self.grid, self.eta = inner, scale, grid, eta
        self.noise_schedule = inner.noise_schedule

    def wrapped(self) -> tuple[Denoiser, ...]:
        return (self.inner,)

    def loop_hooks(self) -> LoopHooks:
        return LoopHooks()

    def ratio(self, t: float) -> float:
        """``r = s_down / s`` of the Euler step leaving grid time ``t``."""
        if self.grid is None:
            raise ValueError("CFG++ needs the sampling grid: CFGPlusPlus(scale, sampler=sampler) or grid=sampler.grid(ns)")
        ts = self.grid.t_list
        i = min(range(len(ts) - 1), key=lambda j: abs(ts[j] - t))
        if abs(ts[i] - t) > 1e-6 * max(1.0, abs(t)):
            raise ValueError(f"CFG++ was called at t={t:.6g}, which is not a point of its grid; "
                             "it is exact only for the Euler/DDIM solver on that grid")
        s = self.grid.sigma_list[i] / self.grid.alpha_list[i]
        s_next = self.grid.sigma_list[i + 1] / self.grid.alpha_list[i + 1]
        s_down, _ = ancestral_split(s, s_next, self.eta)
        return s_down / s

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        d_pos, d_neg = call_both(self.inner, x, t, cond, "CFG++")
        tt = torch.as_tensor(t).reshape(-1)
        values, inverse = torch.unique(tt, return_inverse=True)
        r = torch.tensor([self.ratio(float(v)) for v in values.tolist()], dtype=x.dtype, device=x.device)[inverse]
        r = r.expand(x.shape[0]) if r.numel() == 1 else r
        gain = (self.scale / (1.0 - r))[(...,) + (None,) * (x.ndim - 1)]
        return d_neg + gain * (d_pos - d_neg)


