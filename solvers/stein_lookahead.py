"""Look-ahead ("self-consistency") Stein correction: a HYPOTHESIS for SteinDiff's SC variant.

The SteinDiff paper (arXiv 2606.07835) reports its best numbers for an "SC" variant that "uses
look-ahead trajectory information"; its definition is not published. This module implements one
reading of it, built from the structure of the first author's earlier sampler (EVODiff,
arXiv 2509.26096: evaluate the model at the provisional next state, re-correct the same step with
that output, reuse the evaluation as the next step's history, no extra NFE). It is diffsample's
construction, not the paper's algorithm.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from diffsample.core.accounting import add_backward_evals, add_event, forward_rows, measure_model_evals
from diffsample.solvers.numerics import row_sum
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, Solver, SolverState, call_denoise
from diffsample.solvers.stein import NotDifferentiableError, SteinRecord, record_step


class LookaheadState(NamedTuple):
    """The base solver's state and the residual ``u = x_i - T(x_i)`` of the step whose output
    (the provisional state handed back) the next call re-corrects (``None``: nothing pending)."""

    base: SolverState
    u: Tensor | None = None


@dataclass(frozen=True)
class SteinLookahead:
    r"""Look-ahead Stein self-consistency correction of a solver (hypothesis for SteinDiff's "SC"
    variant, arXiv 2606.07835; diffsample's construction, see the module docstring and
    docs/methods/steindiff.md#look-ahead-hypothesis).

    Step ``i`` of the base solver gives the provisional state ``x~ = T(x_i)`` at grid point
    ``i + 1`` and the residual ``u = x_i - x~``. The next call evaluates the model there,
    ``m~ = D(x~, t_{i+1})`` (the evaluation the next step makes anyway), and re-corrects step ``i``
    along its residual, ``x_{i+1} = x_i - gamma u = x~ + delta u`` with ``delta = 1 - gamma``,
    choosing ``gamma`` so that the corrected batch satisfies the Stein identity of the marginal
    ``p_{t_{i+1}}`` with the test function ``f(x) = x``:

    ``mean_b <x - alpha D(x), x> = d sigma^2``            (``E<score, x> + E[div x] = 0``)

    with ``alpha, sigma`` at point ``i + 1`` and ``d`` the per-sample dimension. The model output
    at the corrected state is transported to first order, ``D(x~ + delta u) ~ m~ + delta J u``
    (``J u`` from one VJP ``J^T u``, equal to ``J u`` when the Jacobian is symmetric, as the
    Jacobian of a posterior mean is), so the condition is the quadratic
    ``A + B delta + C delta^2 = 0`` with ``r = x~ - alpha m~``, ``q = u - alpha J u``,
    ``A = mean<r, x~> - d sigma^2``, ``B = mean<q, x~> + mean<r, u>``, ``C = mean<q, u>``; its root
    nearest ``delta = 0`` is taken (no real root: the minimiser ``-B / 2C`` of the discrepancy).
    ``gamma = 1 - delta`` is clipped to ``[gamma_min, gamma_max]``; the transported output
    ``m~ + delta J u`` is served to the base solver as its first call of the step (its history), so
    the run makes exactly the base solver's denoiser calls.

    On Gaussian data ``N(0, s^2 I)`` the transport is exact and the corrected batch has exactly the
    marginal second moment ``mean ||x||^2 = d (alpha^2 s^2 + sigma^2)`` at every corrected point;
    ``gamma_min = gamma_max = 1`` gives the base solver bit for bit (tests/solvers/test_stein_lookahead.py).

    Options:

    * ``gamma_min`` / ``gamma_max``: clip of ``gamma`` (``None``: unbounded); a non-finite
      ``gamma`` falls back to 1 (event ``stein_fallback``, ``fallback=True`` in
      :func:`~diffsample.solvers.stein.stein_trace`).
    * ``apply_steps``: ``"all"``, ``"all_but_last"`` (not the output of the second-to-last step,
      i.e. not the last point the model is evaluated at, which on a grid to sigma = 0 is the
      smallest sigma, where the condition ``d sigma^2`` is tiny and dominated by model error) or
      an int ``k`` (the outputs of the first ``k`` steps). The output of the last step is never
      re-corrected (no evaluation follows it; none at sigma = 0).
    * ``transport``: serve ``m~ + delta J u`` (True) or ``m~`` as evaluated at ``x~`` (False, as
      EVODiff and UniPC reuse their look-ahead evaluation).

    Shapes: ``x`` is ``(B, *dims)``, native space. Statistics are batch means, so samples are
    coupled through their batch (``batch_coupled``). The base must be deterministic and make its
    first denoiser call at ``(x, t_i)`` (every registered deterministic solver does); UniPC is
    refused, since its corrector recomputes the state from its own history and would undo the
    re-correction.

    Cost per sample: ``nfe`` as the base; ``model_evals`` the base's plus 2 per re-corrected step
    (one VJP through the look-ahead call). ``order`` is 0: with a finite batch the correction also
    moves the batch's second moment by its sampling error, which does not vanish as steps shrink.

    Records: ``stein_trace`` gets one :class:`~diffsample.solvers.stein.SteinRecord` per step, ``i``
    the step whose output was re-corrected and ``sigma`` its starting sigma.

    Raises:
        ValueError: a base that is not a deterministic solver, a UniPC base, ``gamma_min >
            gamma_max``, bad ``apply_steps``.
        NotDifferentiableError: (at run time) the denoiser output has no gradient with respect to x.
    """

    base: Solver
    gamma_min: float | None = 0.5
    gamma_max: float | None = 2.0
    apply_steps: Literal["all", "all_but_last"] | int = "all"
    transport: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.base, Solver) or self.base.stochastic:
            raise ValueError(f"base must be a deterministic solver, got {self.base!r}")
        if type(self.base).__name__ == "UniPC":
            raise ValueError("base must not be UniPC (its corrector recomputes the state and undoes the "
                             "re-correction); use dpmpp_2m, dpmpp_3m, euler or heun")
        a = self.apply_steps
        if not (a in ("all", "all_but_last") or (isinstance(a, int) and not isinstance(a, bool) and a >= 0)):
            raise ValueError(f"apply_steps must be 'all', 'all_but_last' or an int k >= 0; got {a!r}")
        if self.gamma_min is not None and self.gamma_max is not None and self.gamma_min > self.gamma_max:
            raise ValueError(f"gamma_min must be <= gamma_max, got {self.gamma_min} > {self.gamma_max}")

    @property
    def order(self) -> int:
        return 0 if self.apply_steps != 0 else self.base.order

    @property
    def stochastic(self) -> bool:
        return False

    @property
    def batch_coupled(self) -> bool:
        """``True`` when any step is re-corrected: ``gamma`` comes from batch means."""
        return self.apply_steps != 0

    def corrects(self, grid: Grid, i: int) -> bool:
        """Whether the output of step ``i`` is re-corrected (a look-ahead evaluation follows it)."""
        if i + 1 >= grid.steps:
            return False
        if self.apply_steps == "all":
            return True
        if self.apply_steps == "all_but_last":
            return i + 2 < grid.steps
        return i < self.apply_steps

    def init(self, x: Tensor, grid: Grid) -> LookaheadState:
        return LookaheadState(self.base.init(x, grid))

    def nfe(self, grid: Grid) -> int:
        """Denoiser calls of a run: the base solver's (the look-ahead call is the next step's)."""
        return self.base.nfe(grid)

    def model_evals(self, grid: Grid) -> float:
        """Network passes per sample, in forward-equivalents: the base's + 2 per re-corrected step."""
        total = 0.0
        for i in range(grid.steps):
            total += self.base.nfe(grid.segment(i)) + (2.0 if self.corrects(grid, i) else 0.0)
        return total

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: LookaheadState, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, LookaheadState]:
        served: Tensor | None = None
        if state.u is not None:
            x, served = self._recorrect(denoise, x, grid, i, state.u)
        x_next, base_state = self.base.step(_serve_first(denoise, served), x, grid, i, state.base, noise_fn)
        u = (x - x_next).detach() if self.corrects(grid, i) else None
        return x_next, LookaheadState(base_state, u)

    def _recorrect(self, denoise: Denoise, x: Tensor, grid: Grid, i: int, u: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluate at the provisional state ``x`` (point ``i``), re-correct step ``i - 1``; returns
        the corrected state and the model output to serve for it."""
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            with measure_model_evals() as measured:
                m = call_denoise(denoise, x_, grid.t_list[i])
            if not m.requires_grad:
                raise NotDifferentiableError("SteinLookahead: the denoiser output has no gradient with respect to x "
                                             "(model run without autograd?)")
            (ju,) = torch.autograd.grad(m, x_, u.to(m.dtype), allow_unused=True)
        add_backward_evals(forward_rows(measured))
        m = m.detach()
        ju = torch.zeros_like(m) if ju is None else ju.detach()
        alpha, sigma = grid.alpha_list[i], grid.sigma_list[i]
        x64, m64, u64, ju64 = (v.double() for v in (x.detach(), m, u, ju))
        r, q = x64 - alpha * m64, u64 - alpha * ju64
        dim = x[0].numel()
        a = float(row_sum(r * x64).mean()) - dim * sigma**2
        b = float(row_sum(q * x64).mean() + row_sum(r * u64).mean())
        c = float(row_sum(q * u64).mean())
        gamma_raw = 1.0 - _nearest_root(a, b, c)
        fallback = not math.isfinite(gamma_raw)
        gamma = 1.0 if fallback else min(max(gamma_raw, self.gamma_min if self.gamma_min is not None else -math.inf),
                                         self.gamma_max if self.gamma_max is not None else math.inf)
        if fallback:
            add_event("stein_fallback")
            warnings.warn(f"SteinLookahead: non-finite gamma for step {i - 1}; keeping the plain candidate",
                          stacklevel=3)
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        record_step(SteinRecord(i - 1, grid.sigma_list[i - 1], ones * gamma, ones * gamma_raw, True, fallback))
        delta = 1.0 - gamma
        if delta == 0.0:
            return x, m
        return x + delta * u.to(x.dtype), (m + delta * ju if self.transport else m)




def _nearest_root(a: float, b: float, c: float) -> float:
    """Root of ``a + b t + c t^2`` nearest 0 (stable form); without a real root, ``-b / 2c``."""
    if c == 0.0:
        return -a / b if b != 0.0 else math.nan
    disc = b * b - 4.0 * a * c
    if disc < 0.0:
        return -b / (2.0 * c)
    q = -0.5 * (b + math.copysign(math.sqrt(disc), b))
    return a / q if q != 0.0 else -b / (2.0 * c)


def _serve_first(denoise: Denoise, served: Tensor | None) -> Denoise:
    """``denoise`` whose first call of the step returns ``served`` (the re-corrected look-ahead output)."""
    if served is None:
        return denoise
    pending = [served]

    def wrapped(x: Tensor, t: Tensor) -> Tensor:
        if pending:
            return pending.pop().to(x.dtype)
        return denoise(x, t)

    return wrapped
