"""Small shared numerical helpers (written once; private to the solvers package)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims to ``v`` until it has ``ndim`` dims (k-diffusion ``utils``)."""
    return v[(...,) + (None,) * (ndim - v.ndim)]


def alpha_sigma(noise_schedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``noise_schedule.alpha(t), .sigma(t)`` per row as ``(B, 1, ..., 1)`` tensors in ``x``'s dtype and
    device (``t`` scalar or ``(B,)``), broadcastable against ``x``."""
    t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t64.ndim == 0:
        t64 = t64.expand(x.shape[0])
    return (append_dims(noise_schedule.alpha(t64).to(x), x.ndim),
            append_dims(noise_schedule.sigma(t64).to(x), x.ndim))


def row_sum(v: Tensor) -> Tensor:
    """Per-sample sum over all but the batch dimension: ``(B, ...) -> (B,)``."""
    return v.flatten(1).sum(1)


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation like ``numpy.interp`` (``xp`` increasing), differentiable in ``x``.

    Values outside ``[xp[0], xp[-1]]`` are extrapolated linearly from the end segments.
    """
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    w = (x - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)


def expm1_neg(h: float) -> float:
    """``1 - exp(-h)`` (``h * phi_1(-h)`` in DPM-Solver++ notation), exact for ``h = inf``."""
    return -math.expm1(-h)


def ancestral_split(sigma_ve: float, sigma_ve_next: float, eta: float) -> tuple[float, float]:
    """Split a VE step into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``.

    k-diffusion ``get_ancestral_step``: ``sigma_up = min(sigma_next, eta * sqrt(sigma_next**2 *
    (sigma**2 - sigma_next**2) / sigma**2))``, ``sigma_down = sqrt(sigma_next**2 - sigma_up**2)``.
    With ``eta = 1`` this is the DDPM posterior (ancestral) step; ``eta = 0`` gives DDIM.
    """
    if eta == 0.0 or sigma_ve_next == 0.0:
        return sigma_ve_next, 0.0
    # sigma_ve = inf (alpha = 0, a flow grid's t = 1) is the limit sigma_up = min(sigma_next, eta sigma_next).
    up = min(sigma_ve_next, eta * sigma_ve_next * math.sqrt(max(1.0 - (sigma_ve_next / sigma_ve) ** 2, 0.0)))
    down = math.sqrt(max(sigma_ve_next**2 - up**2, 0.0))
    return down, up


def solve_small(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small dense system ``a @ x = b`` (Gaussian elimination with partial pivoting).

    For the 1x1 to 3x3 systems of UniPC's coefficients; pure Python to keep per-step overhead low.
    """
    n = len(b)
    m = [list(row) + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
