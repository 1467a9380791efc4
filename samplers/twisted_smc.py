"""Twisted sequential Monte Carlo over any stochastic solver (TDS, Wu et al. 2023, arXiv 2306.17775,
Algorithm 1; docs/methods/jeffrey.md#twisted-smc-jeffreyparticlesk)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffsample.guidance.term import Cond, Denoiser
from diffsample.guidance.jeffrey.twist import TDS, TwistRecord, no_twist
from diffsample.core.accounting import add_event
from diffsample.solvers.solver import Grid, NoiseFn, Solver, tree_map
from diffsample.solvers.transition import use_transition

ChainNoise = Callable[[int], tuple[Tensor, "NoiseFn | None"]]


def twisted_smc(solver: Solver, grid: Grid, denoise: Callable[[Tensor, Tensor], Tensor], twisted: Denoiser,
                noise: Tensor, cond: Cond | None, noise_fn: NoiseFn | None, chain_noise: ChainNoise | None,
                prior_std: float, on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    r"""Run ``K = twisted.twist.particles`` particles per output and return one particle per output.

    Target: the path measure of the *unguided* sampler reweighted by the final potential ``G(x_0)``,
    i.e. ``p_theta(x_0) G(x_0)`` (for Jeffrey guidance, the Jeffrey-updated model). Per step
    ``i -> i + 1`` with proposal kernel ``N(m_J, s^2)`` (the solver's step on the *guided* data
    prediction) and base kernel ``N(m_0, s^2)`` (the same step on the unguided one, ``D_J - delta``):

    ``log w += log N(x'; m_0, s^2) - log N(x'; m_J, s^2) + log G_{i+1}(x') - log G_i(x)``,

    initial weight ``log G_0(x_T)``, final twist the potential ``log G(x_0)``
    (``twisted.log_potential``). A group of ``K`` particles is resampled (systematic or
    multinomial) when its effective sample size drops below ``ess * K``; the output is drawn from
    each group with probability ``∝ w``. A deterministic step (``s = 0``, e.g. the last step to
    ``sigma = 0``) has no density ratio to correct a guided move with, so it takes the *unguided*
    move (guiding the last jump to ``sigma = 0`` biased the output back toward ``p_theta`` on the GMM
    test); its ``G`` change is carried by the twist.

    Multistep SDE solvers (``dpmpp_2m_sde``) keep two histories along the particle's path: the
    guided one for the proposal and the unguided one for the base kernel (mixing them put a
    spurious shift into the base mean and log-weights with spread 2.0 on the GMM test).

    Args:
        solver: a stochastic solver that calls the denoiser once per step at the current state.
        grid: the run's grid.
        denoise: ``(x, t) -> D`` over all ``K * B`` rows (the sampler's counting, checking call of
            the full guided chain).
        twisted: the :class:`~diffsample.guidance.jeffrey.twist.TwistedDenoiser` inside that chain.
        noise: ``(B, *dims)`` initial noise of particle 0 of every output; particle ``k >= 1``
            starts from ``chain_noise(k)`` (fresh ``torch.randn`` without it).
        cond: the ``(B, ...)`` condition; repeated for every particle.
        noise_fn: the SDE noise of particle 0 (``chain_noise(k)[1]`` for the others).
        prior_std: std of the initial state (``noise * prior_std``).
        on_step: called with ``(i, x)`` after every step (all ``K * B`` particles).

    Returns:
        ``(B, *dims)`` samples.

    Raises:
        ValueError: the solver calls the denoiser elsewhere than once at the current state, or the
            twisted term saw a batch other than all particles.
    """
    settings: TDS = twisted.twist
    k_count, b = settings.particles, noise.shape[0]
    rows = k_count * b
    starts, fns = [noise], [noise_fn]
    for k in range(1, k_count):
        n_k, f_k = chain_noise(k) if chain_noise is not None else (torch.randn_like(noise), None)
        starts.append(n_k.to(noise.dtype))
        fns.append(f_k)

    def draw_one(f: NoiseFn | None, sigma: float, sigma_next: float) -> Tensor:
        return f(sigma, sigma_next) if f is not None else torch.randn_like(noise)

    def noise_all(sigma: float, sigma_next: float) -> Tensor:
        return torch.cat([draw_one(f, sigma, sigma_next).to(noise.dtype) for f in fns])

    cond_all = _repeat_cond(cond, k_count, b)
    x = torch.cat(starts) * prior_std
    state = base_state = solver.init(x, grid)  # guided and unguided histories (multistep solvers)
    acc = torch.zeros(rows, dtype=torch.float64, device=x.device)  # log w = acc + log G_i(x_i): acc sums kernel ratios
    gen = torch.Generator().manual_seed(settings.seed)
    for i in range(grid.steps):
        twisted.last = None
        t = torch.full((rows,), grid.t_list[i], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                       device=x.device)
        d = denoise(x, t, cond_all)
        rec = twisted.last if twisted.last is not None else no_twist(rows, x)
        if rec.log_g.shape[0] != rows:
            raise ValueError(f"twisted SMC: the twisted guidance term saw {rec.log_g.shape[0]} rows, expected all "
                             f"{rows} particles (put it outermost, outside CFG)")
        resampled = _resample(acc + rec.log_g, k_count, b, settings, gen)
        if resampled is not None:
            perm, moved = resampled
            x, d = x[perm], d[perm]
            state, base_state = (tree_map(lambda v: v[perm] if v.ndim and v.shape[0] == rows else v, st)
                                 for st in (state, base_state))
            rec = TwistRecord(rec.log_g[perm], rec.delta[perm])
            acc = torch.where(moved, -rec.log_g, acc[perm])
        with use_transition(lambda mean, std, grid_, j, draw: mean):  # the base kernel's mean, no draw
            mean_base, new_base_state = solver.step(_cached(d - rec.delta, x), x, grid, i, base_state, noise_all)
        kernel: dict[str, Any] = {}

        def proposal(mean: Tensor, std: float, grid_: Grid, j: int, draw: Callable[[], Tensor]) -> Tensor:
            shift = mean - mean_base
            if math.isfinite(settings.max_shift):  # keep the proposal within max_shift kernel stds of the base
                norm = shift.to(torch.float64).flatten(1).norm(dim=1).clamp_min(1e-300)
                factor = (settings.max_shift * std / norm).clamp(max=1.0).to(shift.dtype)
                shift = shift * factor.reshape((-1,) + (1,) * (shift.ndim - 1))
            kernel["shift"], kernel["std"] = shift, std
            kernel["z"] = z = draw()
            return mean_base + shift + std * z

        with use_transition(proposal):
            x_next, new_state = solver.step(_cached(d, x), x, grid, i, state, noise_all)
        if kernel and kernel["std"] > 0:
            # log N(x'; m_0, s^2) - log N(x'; m_0 + shift, s^2) with x' = m_0 + shift + s z
            std, shift, z = kernel["std"], kernel["shift"], kernel["z"]
            acc = acc - (_dot(shift, z) / std + 0.5 * _sq(shift) / (std * std))
        else:  # a deterministic step cannot be reweighted: it follows the base sampler
            x_next, new_state = mean_base, new_base_state
        x, state, base_state = x_next, new_state, new_base_state
        if on_step is not None:
            on_step(i, x)
    t_end = torch.full((rows,), grid.t_list[-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                       device=x.device)
    log_w = acc + twisted.log_potential(x, t_end, cond_all, clean=grid.sigma_list[-1] == 0.0)
    pick = _draw_output(log_w, k_count, b, gen)
    add_event("tds_particles", rows)
    return x[pick]


def _sq(v: Tensor) -> Tensor:
    return v.to(torch.float64).flatten(1).pow(2).sum(1)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return (u.to(torch.float64) * v.to(torch.float64)).flatten(1).sum(1)


def _cached(d: Tensor, x: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    def denoise(x_in: Tensor, t: Tensor) -> Tensor:
        if x_in is not x:
            raise ValueError("twisted SMC needs a solver that calls the denoiser once per step at the current state "
                             "(euler_ancestral, ddpm, ddim:eta=1, dpmpp_2m_sde, ...); this one evaluates elsewhere")
        return d
    return denoise


def _groups(log_w: Tensor, k: int, b: int) -> Tensor:
    """``(K * B,)`` particle-major log-weights -> normalised weights ``(B, K)``."""
    lw = log_w.reshape(k, b).t()
    return torch.softmax(torch.nan_to_num(lw, nan=-math.inf), dim=1)


def _resample(log_w: Tensor, k: int, b: int, settings: TDS, gen: torch.Generator) -> tuple[Tensor, Tensor] | None:
    """``(perm, moved)``: the row permutation ``(K * B,)`` that resamples every group whose ESS is
    below ``ess * K``, and which rows belong to a resampled group; ``None`` if no group is resampled."""
    if k == 1 or settings.ess == 0.0:
        return None
    w = _groups(log_w, k, b).cpu()
    ess = 1.0 / w.pow(2).sum(1)
    low = ess < settings.ess * k - 1e-12
    if not bool(low.any()):
        return None
    if settings.resample == "systematic":
        u = (torch.rand(b, 1, generator=gen, dtype=torch.float64) + torch.arange(k, dtype=torch.float64)) / k
        idx = torch.searchsorted(w.cumsum(1).clamp_max(1.0), u.clamp_max(1.0 - 1e-12)).clamp_max(k - 1)
    else:
        idx = torch.multinomial(w, k, replacement=True, generator=gen)
    idx = torch.where(low[:, None], idx, torch.arange(k).expand(b, k))
    add_event("tds_resample", int(low.sum()))
    cols = torch.arange(b)[:, None]
    perm = (idx * b + cols).t().reshape(-1)  # new particle (k, b) <- old particle (idx[b, k], b)
    moved = torch.zeros(k * b, dtype=torch.bool)
    moved.view(k, b)[:, low] = True
    return perm.to(log_w.device), moved.to(log_w.device)


def _draw_output(log_w: Tensor, k: int, b: int, gen: torch.Generator) -> Tensor:
    """Row index ``(B,)`` of the particle drawn from each group with probability ``∝ w``."""
    w = _groups(log_w, k, b).cpu()
    w = torch.where(torch.isfinite(w).all(1, keepdim=True) & (w.sum(1, keepdim=True) > 0), w, torch.ones_like(w))
    pick = torch.multinomial(w, 1, generator=gen).squeeze(1)
    return (pick * b + torch.arange(b)).to(log_w.device)


def _repeat_cond(cond: Cond | None, k: int, b: int) -> Cond | None:
    """``cond`` with every batch-first tensor repeated ``k`` times, particle-major (row ``j * B + i``)."""
    if cond is None or k == 1:
        return cond
    return cond.map(lambda v: v.repeat(k, *([1] * (v.ndim - 1)))
                    if isinstance(v, Tensor) and v.ndim and v.shape[0] == b else v)
