"""Contractivity diagnostic: per-step local Lipschitz constant of a solver's step map.

The SteinDiff paper (arXiv 2606.07835, section "contractivity trap") observes that the discrete
solver map ``T_i: x_i -> x_{i+1}`` is not a contraction at few steps (local Lipschitz constants far
above 1) and stays above 1 even at 100 steps. This module measures ``||dT_i/dx||_2`` along a
trajectory, with the solver history frozen (docs/methods/steindiff.md#contractivity-diagnostic):

* ``"power"``: power iteration on ``J^T J`` per sample, ``J v`` and ``J^T w`` by autograd through
  the step's single forward pass (double-backward trick), ``iters`` iterations; converges to the
  spectral norm from below.
* ``"secant"``: ``max_m ||T(x + delta v_m) - T(x)|| / (delta ||v_m||)`` over ``directions`` random
  unit directions, ``delta = delta_rel * rms(x)`` per sample; a lower bound that needs no
  gradients (all directions batched into one extra call of the step).

The Jacobian of a per-sample network is block-diagonal over the batch, so every estimate is per
sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, Solver
from diffsample.solvers.solver import tree_map
from diffsample.solvers.stein import _repeat_batch


@dataclass(frozen=True)
class StepLipschitz:
    """Local Lipschitz estimates of step ``i`` (``x_i -> x_{i+1}``).

    Attributes:
        i: step index (0 = noisiest).
        sigma, sigma_next: native sigma at grid points ``i`` and ``i + 1``.
        power: per-sample power-iteration estimate of ``||J_T||_2``, shape ``(B,)`` (or ``None``).
        secant: per-sample secant estimate, shape ``(B,)`` (or ``None``).
    """

    i: int
    sigma: float
    sigma_next: float
    power: Tensor | None
    secant: Tensor | None

    def summary(self) -> dict[str, float]:
        """Median, p99 and max over the batch of each available estimate."""
        out: dict[str, float] = {"i": self.i, "sigma": self.sigma, "sigma_next": self.sigma_next}
        for name in ("power", "secant"):
            v = getattr(self, name)
            if v is not None:
                v = v.double()
                out[f"{name}_median"] = float(v.median())
                out[f"{name}_p99"] = float(torch.quantile(v, 0.99))
                out[f"{name}_max"] = float(v.max())
        return out


def _unit(v: Tensor) -> Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-300).reshape((-1,) + (1,) * (v.ndim - 1))


def spectral_norm(solver: Solver, denoise: Denoise, x: Tensor, grid: Grid, i: int, state, *,
                  iters: int = 20, noise_fn: NoiseFn | None = None) -> Tensor:
    """Per-sample ``||dT_i/dx||_2`` at ``x`` by power iteration on ``J^T J``, shape ``(B,)``.

    Needs a denoiser differentiable twice in ``x`` (the double-backward trick gives ``J v``).

    Raises:
        ValueError: ``iters < 1``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    state = tree_map(torch.Tensor.detach, state)
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        out, _ = solver.step(denoise, x_, grid, i, state, noise_fn)
        w = torch.zeros_like(out, requires_grad=True)
        (jt_w,) = torch.autograd.grad(out, x_, w, create_graph=True)  # J^T w, linear in w
        v = _unit(torch.randn_like(x))
        norm = torch.zeros(x.shape[0], dtype=torch.float64)
        for _ in range(iters):
            (jv,) = torch.autograd.grad(jt_w, w, v, retain_graph=True)  # J v
            (jtjv,) = torch.autograd.grad(out, x_, jv, retain_graph=True)  # J^T J v
            norm = jv.detach().flatten(1).norm(dim=1).double()
            v = _unit(jtjv.detach())
    return norm


def secant_norm(solver: Solver, denoise: Denoise, x: Tensor, grid: Grid, i: int, state, *,
                directions: int = 8, delta_rel: float = 1e-3, noise_fn: NoiseFn | None = None) -> Tensor:
    """Per-sample secant estimate ``max_m ||T(x + delta v_m) - T(x)|| / delta`` (unit ``v_m``), ``(B,)``.

    Raises:
        ValueError: ``directions < 1`` or ``delta_rel <= 0``.
    """
    if directions < 1 or not delta_rel > 0:
        raise ValueError(f"need directions >= 1 and delta_rel > 0, got {directions}, {delta_rel}")
    b, n = x.shape[0], directions + 1
    delta = delta_rel * x.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    delta = delta.reshape((b,) + (1,) * (x.ndim - 1))
    v = torch.stack([_unit(torch.randn_like(x)) for _ in range(directions)])
    x_rep = torch.cat([x, (x.unsqueeze(0) + delta * v).flatten(0, 1)])
    rep_noise = None if noise_fn is None else (lambda s, sn: _repeat_batch(noise_fn(s, sn), n, b))
    with torch.no_grad():
        out, _ = solver.step(denoise, x_rep, grid, i, _repeat_batch(state, n, b), rep_noise)
    diff = (out[b:].reshape(directions, *x.shape) - out[:b]) / delta
    return diff.flatten(2).norm(dim=2).max(0).values.double()


def lipschitz_along_trajectory(solver: Solver, denoise: Denoise, x: Tensor, grid: Grid, *,
                               method: Literal["power", "secant", "both"] = "both", iters: int = 20,
                               directions: int = 8, delta_rel: float = 1e-3,
                               noise_fn: NoiseFn | None = None) -> list[StepLipschitz]:
    """Run ``solver`` from ``x`` (native space, grid point 0) over ``grid`` and estimate the local
    Lipschitz constant of every step map at the trajectory's points, history frozen.

    ``denoise`` is ``(x, t) -> denoised`` with ``t`` of shape ``(B,)`` (e.g.
    ``lambda x, t: denoiser(x, t, cond)``). Returns one :class:`StepLipschitz` per step; extra
    network passes are not part of any sampling run's accounting.

    Raises:
        ValueError: unknown ``method``.
    """
    if method not in ("power", "secant", "both"):
        raise ValueError(f"method must be 'power', 'secant' or 'both', got {method!r}")
    out = []
    state = solver.init(x, grid)
    for i in range(grid.steps):
        power = secant = None
        if method in ("power", "both"):
            power = spectral_norm(solver, denoise, x, grid, i, state, iters=iters, noise_fn=noise_fn)
        if method in ("secant", "both"):
            secant = secant_norm(solver, denoise, x, grid, i, state, directions=directions,
                                 delta_rel=delta_rel, noise_fn=noise_fn)
        out.append(StepLipschitz(i, grid.sigma_list[i], grid.sigma_list[i + 1], power, secant))
        with torch.no_grad():
            x, state = solver.step(denoise, x, grid, i, state, noise_fn)
    return out
