"""SteinDiff: a Stein-identity step-size correction wrapped around any solver (experimental)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from diffsample.core.accounting import add_event, add_model_evals, forward_rows, measure_model_evals
from diffsample.solvers.numerics import row_sum
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, Solver, SolverState, tree_map

ApplySteps = Literal["all", "all_but_last"] | int | Callable[[int, Grid], bool]


class NotDifferentiableError(RuntimeError):
    """The denoiser's output carries no gradient with respect to its input (VJP/JVP impossible)."""


@dataclass(frozen=True)
class SteinRecord:
    """What one :class:`SteinDiff` step did (collected by :func:`stein_trace`).

    Attributes:
        i: grid step index.
        sigma: native sigma at grid point ``i``.
        gamma: the applied coefficient, shape ``(B,)`` (all entries equal with batch statistics;
            ones on steps that are not corrected or fell back).
        gamma_raw: the estimate before clipping, shape ``(B,)`` (NaN on uncorrected steps).
        corrected: whether the correction was attempted on this step.
        fallback: whether a non-finite estimate made the step fall back to the plain candidate.
    """

    i: int
    sigma: float
    gamma: Tensor
    gamma_raw: Tensor
    corrected: bool
    fallback: bool


_TRACE: ContextVar[list[SteinRecord] | None] = ContextVar("diffsample_stein_trace", default=None)


@contextmanager
def stein_trace() -> Iterator[list[SteinRecord]]:
    """Collect a :class:`SteinRecord` for every :class:`SteinDiff` step run inside the block.

    ``sum(r.fallback for r in records)`` counts the steps that fell back to the plain candidate.
    """
    records: list[SteinRecord] = []
    token = _TRACE.set(records)
    try:
        yield records
    finally:
        _TRACE.reset(token)


def _record(record: SteinRecord) -> None:
    records = _TRACE.get()
    if records is not None:
        records.append(record)


def record_step(record: SteinRecord) -> None:
    """Add ``record`` to the enclosing :func:`stein_trace` (no-op outside one): for Stein-type
    solvers defined elsewhere (:class:`~diffsample.solvers.stein_lookahead.SteinLookahead`)."""
    _record(record)



def _repeat_batch(tree: Any, n: int, batch: int) -> Any:
    """Repeat every batched tensor (leading dim ``batch``) of ``tree`` ``n`` times along dim 0."""
    return tree_map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))) if t.ndim and t.shape[0] == batch else t, tree)


def _take_batch(tree: Any, batch: int, n: int) -> Any:
    """The first ``batch`` rows of every tensor that :func:`_repeat_batch` enlarged ``n`` times."""
    return tree_map(lambda t: t[:batch] if t.ndim and t.shape[0] == n * batch else t, tree)


@dataclass(frozen=True)
class SteinDiff:
    r"""SteinDiff correction of any solver (Li & Zeng, ICML 2026, arXiv 2606.07835, Algorithm 1 and
    the reference-free coefficient of its Theorem "stainopt_gamma"; reconstruction and the
    options' rationale: docs/methods/steindiff.md).

    Each step runs the wrapped solver once to get its candidate ``T(x)`` for the state ``x`` at grid
    point ``i`` (history detached and frozen), forms the residual ``u = x - T(x)`` and moves
    ``x_next = x - gamma * u`` (``gamma = 1`` is the plain solver). With ``x | x* ~ N(a x*, s^2 I)``
    Stein's lemma gives the coefficient that minimises ``E||x - gamma u - x*||^2`` without ``x*``:

    ``gamma = [(1 - 1/a) E<u, x> + (s^2 / a) E[div u]] / E||u||^2``        (paper eq. for gamma*)

    where ``div u = d - div T`` is estimated with Hutchinson probes ``v^T (dT/dx) v``. Options:

    * ``coupling`` -- what ``x*`` is. ``"marginal"`` (the paper): the clean sample, ``a = alpha_i``,
      ``s = sigma_i``; on Gaussian data the exact coefficient then sends ``x`` to the posterior mean
      ``E[x0 | x]`` for any linear candidate (a denoising jump, not an ODE step).
      ``"transition"``: the true state at grid point ``i + 1``, ``a = alpha_i / alpha_{i+1}``,
      ``s^2 = sigma_i^2 - a^2 sigma_{i+1}^2`` (the DDPM posterior-mean step when exact).
    * ``param_space`` -- ``"native"`` applies the formula to the model's coordinates;
      ``"edm"`` to ``x / alpha`` with VE sigma ``sigma / alpha`` (``a = 1``; removes the
      ``1 - 1/alpha`` term that is ill-conditioned at high noise on VP) and maps back.
    * ``stats`` -- ``"batch"`` (the paper: one ``gamma`` per batch, from batch means; batches of 1
      give a warning, as gamma then comes from one sample) or ``"per_sample"``.
    * ``apply_steps`` -- which steps are corrected: ``"all"`` (the paper), ``"all_but_last"``,
      an int ``k`` (the first ``k`` steps) or a callable ``(i, grid) -> bool``.
    * ``gamma_min`` / ``gamma_max`` -- clip ``gamma`` (``None``: unbounded). The paper has no upper
      clip; with exact scores its literal every-step form diverges (study in
      ``benchmarks/stein_study.py``). A non-finite ``gamma`` falls back to ``gamma = 1`` (the plain
      candidate), with a warning and ``fallback=True`` in :func:`stein_trace`.
    * ``probes`` / ``probe_dist`` -- Hutchinson probes per step, ``"gaussian"`` or ``"rademacher"``;
      ``seed``: probes of step ``i`` come from a generator seeded ``seed + i`` (reproducible runs,
      independent of the sample's shape); ``None`` draws from torch's global generator.
    * ``div_mode`` -- how ``v^T J_T v`` is obtained. ``"vjp"``: one backward pass per probe through
      the step's evaluation (needs a differentiable denoiser; counts 2 model evals per probe per
      denoiser call of the step). ``"jvp"``: forward-mode AD, all probes in one batched call
      (``probes * B`` rows, counted 2 each; fails on some kernels). ``"finite_diff"``:
      ``v^T (T(x + eps v) - T(x)) / eps`` with ``eps = fd_eps * rms(x)``, all probes batched into
      the step's call (each probe row counts 1). All modes keep ``nfe`` equal to the base solver's.

    Defaults (chosen from ``benchmarks/stein_study.py``, see ``benchmarks/results/stein_*.md``):
    ``coupling="transition"``, ``apply_steps=1`` (first step only), ``gamma`` in ``[0.5, 2]``,
    native space, batch statistics, 5 Gaussian VJP probes: diffsample's own variant (registered as
    ``stein_dpm`` / ``stein_unipc``). The paper's literal algorithm (registered as ``stein_paper``) is
    ``coupling="marginal", apply_steps="all", gamma_min=0.0, gamma_max=None``; with exact GMM scores
    it diverges (the corrected state leaves the noise level the formula assumes, ``||u||`` shrinks
    and gamma explodes), and on the MNIST model it destroys samples. On VP models the native first-step
    estimate is usually far out of range (the ``1 - 1/alpha`` term at alpha ~ 0.006) and the clip then
    sets gamma = 0.5. Experimental: no variant beat the plain solver given the same ``model_evals``.

    Shapes: ``x`` is ``(B, *dims)`` in native space; grid index ``i`` runs from the noisiest point
    (0) to the cleanest. The wrapper's state is the base solver's state (tensors detached).

    Cost per corrected step (per sample, base solver with ``c`` denoiser calls on the step):
    ``nfe`` +0; ``model_evals`` ``c (1 + 2 probes)`` (vjp), ``2 c probes`` (jvp),
    ``c (1 + probes)`` (finite_diff); see :meth:`model_evals`.

    Order: the correction is an O(1) change of the trajectory on every corrected step (it does not
    vanish as the step shrinks), so the wrapper does not inherit the base solver's convergence
    order; ``order`` is 0 when any step is corrected (the base order when none is).

    Raises:
        ValueError: ``probes < 1``, unknown ``probe_dist`` / ``div_mode`` / ``coupling`` /
            ``stats`` / ``param_space`` / ``apply_steps``, ``gamma_min > gamma_max``,
            ``fd_eps <= 0``, or a base that is not a solver.
        NotDifferentiableError: (at run time, ``vjp`` / ``jvp``) the denoiser output has no gradient
            with respect to ``x``; use ``div_mode="finite_diff"``.
    """

    base: Solver
    probes: int = 5
    probe_dist: Literal["gaussian", "rademacher"] = "gaussian"
    div_mode: Literal["vjp", "jvp", "finite_diff"] = "vjp"
    coupling: Literal["marginal", "transition"] = "transition"
    stats: Literal["batch", "per_sample"] = "batch"
    gamma_min: float | None = 0.5
    gamma_max: float | None = 2.0
    apply_steps: ApplySteps = 1
    param_space: Literal["native", "edm"] = "native"
    fd_eps: float = 1e-3
    seed: int | None = 0

    def __post_init__(self) -> None:
        if not isinstance(self.base, Solver):
            raise ValueError(f"base must be a solver, got {self.base!r}")
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(f"probes must be an integer >= 1, got {self.probes!r}")
        choices = {"probe_dist": ("gaussian", "rademacher"), "div_mode": ("vjp", "jvp", "finite_diff"),
                   "coupling": ("marginal", "transition"), "stats": ("batch", "per_sample"),
                   "param_space": ("native", "edm")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}; got {getattr(self, name)!r}")
        a = self.apply_steps
        if not (callable(a) or a in ("all", "all_but_last") or (isinstance(a, int) and not isinstance(a, bool) and a >= 0)):
            raise ValueError(f"apply_steps must be 'all', 'all_but_last', an int k >= 0 or a callable (i, grid) -> bool; got {a!r}")
        if self.gamma_min is not None and self.gamma_max is not None and self.gamma_min > self.gamma_max:
            raise ValueError(f"gamma_min must be <= gamma_max, got {self.gamma_min} > {self.gamma_max}")
        if not self.fd_eps > 0:
            raise ValueError(f"fd_eps must be > 0, got {self.fd_eps}")

    # ---- protocol ---------------------------------------------------------------------------------
    @property
    def order(self) -> int:
        return 0 if self.apply_steps != 0 else self.base.order

    @property
    def stochastic(self) -> bool:
        return self.base.stochastic

    @property
    def batch_coupled(self) -> bool:
        """Whether a sample's result depends on the other samples of its batch (and so on the batch
        size): ``True`` when any step is corrected. With ``stats="batch"`` one ``gamma`` comes from
        the batch means; with ``stats="per_sample"`` each sample's Hutchinson probes are the rows of
        one draw of the batch's shape, so they depend on the sample's position in the batch. ``False``
        only for ``apply_steps=0`` (no step corrected: the base solver)."""
        return self.apply_steps != 0

    def init(self, x: Tensor, grid: Grid) -> SolverState:
        return self.base.init(x, grid)

    def nfe(self, grid: Grid) -> int:
        """Denoiser calls of a run: the base solver's (probes are batched into its calls)."""
        return self.base.nfe(grid)

    def corrects(self, grid: Grid, i: int) -> bool:
        """Whether step ``i`` of ``grid`` is corrected (``apply_steps``)."""
        a = self.apply_steps
        if callable(a):
            return bool(a(i, grid))
        if a == "all":
            return True
        if a == "all_but_last":
            return i < grid.steps - 1
        return i < a

    def model_evals(self, grid: Grid) -> float:
        """Network passes per sample of a run, in forward-equivalents (docs/design.md#nfe-and-model_evals)."""
        total = 0.0
        for i in range(grid.steps):
            calls = self.base.nfe(grid.segment(i))
            if not self.corrects(grid, i):
                total += calls
            elif self.div_mode == "vjp":
                total += calls * (1 + 2 * self.probes)
            elif self.div_mode == "jvp":
                total += calls * 2 * self.probes
            else:
                total += calls * (1 + self.probes)
        return total

    # ---- the step ---------------------------------------------------------------------------------
    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: SolverState, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, SolverState]:
        sigma = grid.sigma_list[i]
        if not self.corrects(grid, i):
            x_next, new_state = self.base.step(denoise, x, grid, i, state, noise_fn)
            ones = torch.ones(x.shape[0], dtype=torch.float64)
            _record(SteinRecord(i, sigma, ones, torch.full_like(ones, math.nan), False, False))
            return x_next, new_state
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(self.seed + i)
        if self.stats == "batch" and x.shape[0] == 1:
            warnings.warn("SteinDiff: batch of 1 with stats='batch' estimates gamma from one sample; "
                          "consider stats='per_sample' or a larger batch", stacklevel=2)
        if self.div_mode == "vjp":
            x_next, new_state, div_t = self._vjp(denoise, x, grid, i, state, noise_fn, gen)
        else:
            x_next, new_state, div_t = self._batched(denoise, x, grid, i, state, noise_fn, gen)
        gamma_raw = self._gamma(x, x_next, div_t, grid, i)
        finite = torch.isfinite(gamma_raw)
        gamma = torch.where(finite, gamma_raw, torch.ones_like(gamma_raw))
        if self.gamma_min is not None or self.gamma_max is not None:
            gamma = torch.where(finite, gamma.clamp(min=self.gamma_min, max=self.gamma_max), gamma)
        fallback = not bool(finite.all())
        if fallback:
            add_event("stein_fallback")
            warnings.warn(f"SteinDiff: non-finite gamma at step {i} (sigma={sigma:.4g}); "
                          "using the plain candidate for this step", stacklevel=2)
        _record(SteinRecord(i, sigma, gamma.detach().double().cpu(), gamma_raw.detach().double().cpu(), True, fallback))
        return self._apply(x, x_next, gamma, grid, i), new_state

    def _scales(self, grid: Grid, i: int) -> tuple[float, float]:
        """Factors ``(c, c_next)`` mapping native states at points ``i``, ``i + 1`` to the working space."""
        if self.param_space == "native":
            return 1.0, 1.0
        return 1.0 / grid.alpha_list[i], 1.0 / grid.alpha_list[i + 1]

    def _gamma(self, x: Tensor, x_next: Tensor, div_t: Tensor, grid: Grid, i: int) -> Tensor:
        """The Stein coefficient, shape ``(B,)``, float64 (paper's reference-free gamma*)."""
        c, c_next = self._scales(grid, i)
        x64, t64 = x.detach().double(), x_next.detach().double()
        x_w = c * x64
        u_w = x_w - c_next * t64
        dim = x[0].numel()
        div_u = dim - (c_next / c) * div_t.double()  # div_{x_w} (x_w - c_next T)
        if self.param_space == "native":
            alpha, sigma, alpha_next, sigma_next = (grid.alpha_list[i], grid.sigma_list[i],
                                                    grid.alpha_list[i + 1], grid.sigma_list[i + 1])
        else:
            alpha, sigma = 1.0, grid.sigma_list[i] / grid.alpha_list[i]
            alpha_next, sigma_next = 1.0, grid.sigma_list[i + 1] / grid.alpha_list[i + 1]
        if self.coupling == "marginal":
            a, s2 = alpha, sigma**2
        else:
            a = alpha / alpha_next
            s2 = sigma**2 - a**2 * sigma_next**2
        s_xu, s_uu = row_sum(u_w * x_w), row_sum(u_w * u_w)
        if self.stats == "batch":
            s_xu, s_uu, div_u = (v.mean().expand(x.shape[0]) for v in (s_xu, s_uu, div_u))
        with torch.no_grad():
            return ((1.0 - 1.0 / a) * s_xu + (s2 / a) * div_u) / s_uu

    def _apply(self, x: Tensor, x_next: Tensor, gamma: Tensor, grid: Grid, i: int) -> Tensor:
        """``x_next = (c x - gamma (c x - c_next T)) / c_next`` in the state's dtype."""
        c, c_next = self._scales(grid, i)
        g = gamma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        u_w = c * x - c_next * x_next
        return (c * x - g * u_w) / c_next

    def _probe(self, like: Tensor, gen: torch.Generator | None) -> Tensor:
        if self.probe_dist == "gaussian":
            return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=gen)
        bits = torch.randint(0, 2, like.shape, device=like.device, generator=gen)
        return (2 * bits - 1).to(like.dtype)

    def _vjp(self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: SolverState, noise_fn: NoiseFn | None,
             gen: torch.Generator | None):
        """Base step with autograd on; ``probes`` backward passes give ``v^T J_T v`` per sample."""
        calls, rows = [], [0.0]

        def tracked(x_in: Tensor, t: Tensor) -> Tensor:
            with measure_model_evals() as measured:
                out = denoise(x_in, t)
            rows[0] += forward_rows(measured)
            calls.append(x_in.requires_grad and not out.requires_grad)
            return out

        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            x_next, new_state = self.base.step(tracked, x_, grid, i, tree_map(torch.Tensor.detach, state), noise_fn)
            if any(calls):
                raise NotDifferentiableError(
                    "SteinDiff: the denoiser output has no gradient with respect to x (model run without "
                    "autograd?); use div_mode='finite_diff'")
            divs = []
            for k in range(self.probes):
                v = self._probe(x_, gen)
                (g,) = torch.autograd.grad(x_next, x_, v, retain_graph=k < self.probes - 1, allow_unused=True)
                add_model_evals(2 * rows[0], backward=True)  # one VJP through every network row of the step's calls
                divs.append(row_sum(v * g) if g is not None else torch.zeros(x.shape[0], dtype=x.dtype))
        div_t = torch.stack(divs).mean(0).detach()
        return x_next.detach(), tree_map(torch.Tensor.detach, new_state), div_t

    def _batched(self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: SolverState, noise_fn: NoiseFn | None,
                 gen: torch.Generator | None):
        """``jvp`` / ``finite_diff``: all probes ride in the step's own denoiser call(s)."""
        b, p = x.shape[0], self.probes
        v = torch.stack([self._probe(x, gen) for _ in range(p)])  # (P, B, ...)
        n_rep = p + 1 if self.div_mode == "finite_diff" else p
        rep_noise = None if noise_fn is None else (lambda s, sn: _repeat_batch(noise_fn(s, sn), n_rep, b))
        if self.div_mode == "finite_diff":
            eps = self.fd_eps * x.detach().flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
            eps = eps.reshape((b,) + (1,) * (x.ndim - 1))
            x_rep = torch.cat([x, (x.unsqueeze(0) + eps * v).flatten(0, 1)])
            out, new_state = self.base.step(denoise, x_rep, grid, i, _repeat_batch(state, n_rep, b), rep_noise)
            x_next = out[:b]
            jv = (out[b:].reshape(p, *x.shape) - x_next) / eps
            return x_next, _take_batch(new_state, b, n_rep), _rows_p(v * jv).mean(0)
        from torch.autograd import forward_ad as fwAD

        calls = []

        def tracked(x_in: Tensor, t: Tensor) -> Tensor:
            out = denoise(x_in, t)
            add_model_evals(x_in.shape[0])  # the tangent pass, on top of the adapter's forward count
            calls.append(fwAD.unpack_dual(out).tangent is None)
            return out

        try:
            with fwAD.dual_level():
                x_dual = fwAD.make_dual(x.detach().repeat(p, *([1] * (x.ndim - 1))), v.flatten(0, 1))
                out, new_state = self.base.step(tracked, x_dual, grid, i, _repeat_batch(state, n_rep, b), rep_noise)
                primal, tangent = fwAD.unpack_dual(out)
                new_state = tree_map(lambda t: fwAD.unpack_dual(t).primal, new_state)
        except (RuntimeError, NotImplementedError) as exc:
            raise NotDifferentiableError(f"SteinDiff: forward-mode AD failed through the denoiser ({exc}); "
                                         "use div_mode='vjp' or 'finite_diff'") from None
        if any(calls) or tangent is None:
            raise NotDifferentiableError("SteinDiff: the denoiser output has no forward-mode tangent; "
                                         "use div_mode='finite_diff'")
        jv = tangent.reshape(p, *x.shape)
        return primal[:b].detach(), _take_batch(new_state, b, n_rep), _rows_p(v * jv).mean(0)


def _rows_p(v: Tensor) -> Tensor:
    """Per-probe, per-sample sum: ``(P, B, ...) -> (P, B)``."""
    return v.flatten(2).sum(2)

