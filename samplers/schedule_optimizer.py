"""Per-model step-schedule optimisation: where to put ``N`` model evaluations for one solver.

Both methods fit the grid to the model's own *teacher* trajectories: accurate probability-flow ODE
solutions from calibration noises ``x_T`` (standard normal, scaled by the sampler's prior scale at
``t_max``), recorded at a fine grid of ``M`` times (:func:`fine_grid`; uniform in ``lambda_``
between the noise schedule's ends, its first point at ``t_max``) and at the clean end. The last
step always goes to ``sigma = 0``. GITS keeps the first evaluation at ``t_max`` and chooses the
``N - 1`` times in between; LD3 may also move the first time ``t_0`` below ``t_max`` (the noise is
then drawn there, as the ``leading`` and ``ddim_uniform`` schedules do), still judged against the
teacher's endpoint from ``t_max``.

* :func:`gits_schedule` -- GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
  Sampling", arXiv 2405.11326, section 4): a dynamic program over paths through the fine grid. The
  cost of a step ``t_i -> t_j`` is its local truncation error: the RMS distance between the
  solver's step taken from the teacher's state at ``t_i`` (its history, for a multistep solver,
  being the teacher's denoised value at the previous point ``t_k`` of the path) and the teacher's
  state at ``t_j``. The path of ``N`` steps from ``t_max`` to ``sigma = 0`` with the least total
  cost is exact to find over states ``(t_k, t_i)`` (:func:`local_costs`, :func:`cheapest_path`).
  The costs need no model evaluation beyond the teacher's.
* :func:`ld3_schedule` -- an LD3-style continuous fit (Tong et al., "Learning to Discretize Denoising
  Diffusion ODEs", arXiv 2405.15506): the ``N - 1`` free times, parameterised by a softmax of
  log-sigma increments (always strictly decreasing and inside the schedule's range), minimise the
  RMS distance between the solver's endpoint and the teacher's endpoint over the calibration noises
  (scipy Nelder-Mead; LD3 proper backpropagates an LPIPS loss through the solver, which the
  solvers' scalar grid arithmetic does not allow). It starts from a given grid (the GITS one or the
  best built-in schedule); a start at ``t_max`` is refined first with ``t_0`` fixed, then with
  ``t_0`` free.

All errors are ``sqrt(mean((a - b)^2))`` over samples and dimensions, the GMM benchmark's trajectory
RMSE; a teacher with per-sample ``weights`` (a stratified calibration set, :func:`stratify`) weights
each sample's mean square. Only deterministic solvers can be tuned (a stochastic step has no teacher
trajectory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffsample.solvers.model_time import ModelTimeMap
from diffsample.solvers.solver import Denoise, Grid, NoiseSchedule, Solver
from diffsample.solvers.step_schedules import check_steps

from diffsample.samplers.sampler import prior_scale


def per_sample_ms(a: Tensor, b: Tensor) -> Tensor:
    """``mean_d (a - b)^2`` per sample (over every dimension but the first): shape ``(B,)``, float64."""
    return ((a.double() - b.double()) ** 2).reshape(a.shape[0], -1).mean(1)


def rms(a: Tensor, b: Tensor, weights: Tensor | None = None) -> float:
    """``sqrt(mean((a - b)^2))`` over every element (float64 arithmetic); with ``weights`` (shape
    ``(B,)``, ``B = a.shape[0]``) the per-sample mean squares are averaged with those weights."""
    if weights is None:
        return float(((a.double() - b.double()) ** 2).mean().sqrt())
    w = weights.double()
    return float(((per_sample_ms(a, b) * w).sum() / w.sum()).sqrt())


def check_deterministic(solver: Solver) -> Solver:
    """``solver`` when it is deterministic.

    Raises:
        ValueError: a stochastic solver (naming it).
    """
    if getattr(solver, "stochastic", False):
        raise ValueError(f"schedule optimisation needs a deterministic solver (an ODE step); {solver!r} is "
                         "stochastic: use e.g. dpmpp_2m, unipc_bh2, euler or heun")
    return solver


def fine_grid(ns: NoiseSchedule, m: int) -> Tensor:
    """``m`` evaluation times (``m >= 2``), noisiest first: ``t_max``, then ``m - 1`` times uniform in
    ``lambda_`` from ``t_max_finite`` (excluded when it is ``t_max``) to ``t_min``. Shape ``(m,)``,
    float64, strictly decreasing.

    Raises:
        ValueError: ``m < 2``.
    """
    m = check_steps(m)
    if m < 2:
        raise ValueError(f"a fine grid needs at least 2 points, got {m}")
    lo, hi = ns.sigma_ve_range()
    top = math.log(hi)
    if ns.t_max_finite == ns.t_max:
        u = torch.linspace(top, math.log(lo), m, dtype=torch.float64)[1:]
    else:
        u = torch.linspace(top, math.log(lo), m - 1, dtype=torch.float64)
    t = ns.t_from_sigma_ve(torch.exp(u)).clamp(ns.t_min, ns.t_max)
    t = torch.cat([torch.tensor([float(ns.t_max)], dtype=torch.float64), t])
    keep = torch.cat([torch.tensor([True]), t[1:] < t[:-1]])  # drop repeats from clamping
    return t[keep]


@dataclass(frozen=True)
class Teacher:
    """Teacher trajectories on a fine grid.

    Attributes:
        t: ``(P,)`` fine times, noisiest first; the last is the clean end (``noise_schedule.t_zero``).
        x: ``(P, B, *dims)`` teacher states at ``t`` (``x[0]`` the initial state, ``x[-1]`` the endpoint).
        denoised: ``(P - 1, B, *dims)`` the model's ``denoised`` at ``(x[i], t[i])``.
        noise: ``(B, *dims)`` the standard-normal calibration noises (``x[0] = noise * prior scale``).
        noise_schedule: the process.
        model_evals: denoiser calls per sample the teacher took.
        seconds: CPU seconds (process time) it took.
        weights: ``(B,)`` per-sample weights of every error against this teacher (``None``: equal);
            a stratified calibration set (:func:`stratify`) weights each sample by the share of the
            pool it stands for.
    """

    t: Tensor
    x: Tensor
    denoised: Tensor
    noise: Tensor
    noise_schedule: NoiseSchedule
    model_evals: int = 0
    seconds: float = 0.0
    weights: Tensor | None = None

    @property
    def points(self) -> int:
        return self.t.numel()

    @property
    def endpoint(self) -> Tensor:
        return self.x[-1]


def _eval_grid(ns: NoiseSchedule, t_eval: Tensor) -> Grid:
    return Grid.from_t(ns, t_eval, final_zero=True)


def solver_teacher(denoise: Denoise, ns: NoiseSchedule, noise: Tensor, t_fine: Tensor, solver: Solver,
                   substeps: int = 4, progress: bool = False) -> Teacher:
    """Teacher trajectories by ``solver`` (deterministic, evaluating the model at its states, e.g.
    DPM-Solver++(3M)) on ``t_fine`` with each interval split into ``substeps`` equal parts in ``t``.

    Args:
        denoise: ``(x, t) -> denoised`` with conditioning bound.
        ns: its noise schedule.
        noise: ``(B, *dims)`` standard-normal calibration noises.
        t_fine: ``(m,)`` fine evaluation times (:func:`fine_grid`); the clean end is appended.
        solver: the teacher's solver.
        substeps: teacher steps per fine interval (>= 1).
    """
    start = time.process_time()
    substeps = check_steps(substeps)
    t_fine = torch.as_tensor(t_fine, dtype=torch.float64)
    grid = _eval_grid(ns, substep_times(t_fine, substeps))
    x = noise * prior_scale(grid)
    states, outs = [], []
    record = set(range(0, grid.steps, substeps))
    calls = [0]

    def capture(x_in: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        return denoise(x_in, t)

    state = solver.init(x, grid)
    with torch.no_grad():
        for i in tqdm(range(grid.steps), disable=not progress, leave=False, desc="teacher"):
            if i in record:
                d = capture(x, torch.full((x.shape[0],), grid.t_list[i], dtype=torch.float64 if x.dtype == torch.float64
                                          else torch.float32))
                states.append(x)
                outs.append(d)
                x, state = solver.step(lambda x_in, t, _d=d, _x=x: _d if x_in is _x else capture(x_in, t),
                                       x, grid, i, state)
            else:
                x, state = solver.step(capture, x, grid, i, state)
    states.append(x)
    t_all = torch.cat([t_fine, torch.tensor([float(ns.t_zero)], dtype=torch.float64)])
    return Teacher(t=t_all, x=torch.stack(states), denoised=torch.stack(outs), noise=noise, noise_schedule=ns,
                   model_evals=calls[0], seconds=time.process_time() - start)


def substep_times(t_fine: Tensor, substeps: int) -> Tensor:
    """``t_fine`` with each interval split into ``substeps`` equal parts in ``t``: shape
    ``((m - 1) * substeps + 1,)``, float64, noisiest first."""
    t_fine = torch.as_tensor(t_fine, dtype=torch.float64)
    parts = [torch.linspace(float(a), float(b), check_steps(substeps) + 1, dtype=torch.float64)[:-1]
             for a, b in zip(t_fine[:-1], t_fine[1:])]
    return torch.cat(parts + [t_fine[-1:]])


def run_solver(solver: Solver, denoise: Denoise, ns: NoiseSchedule, noise: Tensor, t_eval: Tensor,
               t_model: Tensor | None = None) -> Tensor:
    """The solver's endpoint from ``noise`` on the grid ``t_eval`` + ``sigma = 0`` (as the sampler
    runs it: ``x = noise * prior scale``, one ``solver.step`` per interval); with ``t_model`` (shape
    of ``t_eval``) the model is evaluated at those decoupled times (:class:`ModelTimeMap`)."""
    grid = _eval_grid(ns, torch.as_tensor(t_eval, dtype=torch.float64))
    if t_model is not None:
        denoise = ModelTimeMap(grid.t_list[:-1], torch.as_tensor(t_model).tolist(), ns).wrap(denoise)
    x = noise * prior_scale(grid)
    state = solver.init(x, grid)
    with torch.no_grad():
        for i in range(grid.steps):
            x, state = solver.step(denoise, x, grid, i, state)
    return x


def endpoint_rmse(solver: Solver, denoise: Denoise, teacher: Teacher, t_eval: Tensor,
                  t_model: Tensor | None = None) -> float:
    """RMS distance between the solver's endpoint on ``t_eval`` (model times ``t_model``, if given)
    and the teacher's endpoint (weighted by ``teacher.weights`` where it has them)."""
    return rms(run_solver(solver, denoise, teacher.noise_schedule, teacher.noise, t_eval, t_model), teacher.endpoint,
               teacher.weights)


def local_costs(solver: Solver, teacher: Teacher, denoise: Denoise | None = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Local truncation errors of ``solver`` between the teacher's fine points.

    Returns:
        ``(first, cost)``: ``first[i]`` the RMS error of a first step ``t_0 -> t_i`` (no history) from
        the teacher's initial state, shape ``(P,)``; ``cost[k, i, j]`` the RMS error of a step
        ``t_i -> t_j`` from the teacher's state at ``t_i`` after a step from ``t_k`` (the solver's
        history is the teacher's), shape ``(P, P, P)``, ``inf`` unless ``k < i < j``; ``i < P - 1``.

    A solver evaluation away from the teacher's states (a Heun stage) calls ``denoise``
    (``None``: refused with a ``ValueError``).
    """
    check_deterministic(solver)
    ns, p = teacher.noise_schedule, teacher.points
    t_eval = teacher.t[:-1]  # evaluation times; index p - 1 is the clean end
    first = np.full(p, np.inf)
    cost = np.full((p, p, p), np.inf)

    xs = list(teacher.x.unbind(0))  # per-point tensors, so an identity check finds the teacher's states
    ds = list(teacher.denoised.unbind(0))

    def lookup(k: int) -> Denoise:
        def cached(x_in: Tensor, t: Tensor) -> Tensor:
            if x_in is xs[k]:
                return ds[k]
            if denoise is None:
                raise ValueError(f"{type(solver).__name__} evaluates the model away from the teacher's states; "
                                 "local costs need the model's denoise")
            return denoise(x_in, t)
        return cached

    def grid_of(idx: Sequence[int]) -> Grid:
        return _eval_grid(ns, t_eval[list(idx)])

    pairs = [(k, i) for i in range(1, p) for k in range(i)]
    bar = tqdm(total=len(pairs), disable=not progress, leave=False, desc="local costs")
    with torch.no_grad():
        for i in range(1, p):
            # First steps t_0 -> t_i.
            g = grid_of([0] if i == p - 1 else [0, i])
            x1, _ = solver.step(lookup(0), xs[0], g, 0, solver.init(xs[0], g))
            first[i] = rms(x1, xs[i], teacher.weights)
        for k, i in pairs:
            bar.update()
            if i == p - 1:
                continue
            g = grid_of([k, i])
            _, state = solver.step(lookup(k), xs[k], g, 0, solver.init(xs[k], g))
            for j in range(i + 1, p):
                gj = grid_of([k, i] if j == p - 1 else [k, i, j])
                xj, _ = solver.step(lookup(i), xs[i], gj, 1, state)
                cost[k, i, j] = rms(xj, xs[j], teacher.weights)
    bar.close()
    return first, cost


def cheapest_path(first: np.ndarray, cost: np.ndarray, steps: int) -> tuple[list[int], float]:
    """The fine-grid path ``0 = i_0 < i_1 < ... < i_steps = P - 1`` with the least total cost
    ``first[i_1] + sum_s cost[i_{s-1}, i_s, i_{s+1}]`` (dynamic programming over the states
    ``(previous point, current point)``, exact). Returns ``(path, total cost)``.

    Raises:
        ValueError: ``steps`` < 1 or more than the fine grid's ``P - 1`` intervals.
    """
    steps = check_steps(steps)
    p = first.shape[0]
    if steps > p - 1:
        raise ValueError(f"{steps} steps need a fine grid of more than {steps} points, got {p}; raise fine_steps")
    value = np.full((p, p), np.inf)  # value[k, i]: best cost reaching i with previous point k
    value[0, 1:] = first[1:]
    back = []
    for _ in range(steps - 1):
        # new[i, j] = min_k value[k, i] + cost[k, i, j]
        total = value[:, :, None] + cost
        arg = np.argmin(total, axis=0)
        new = np.take_along_axis(total, arg[None], axis=0)[0]
        back.append(arg)
        value = new
    value = np.where(np.arange(p)[None, :] == p - 1, value, np.inf)  # the path ends at the clean end
    k, i = np.unravel_index(np.argmin(value), value.shape)
    best = float(value[k, i])
    if not math.isfinite(best):
        raise ValueError(f"no path of {steps} steps through a fine grid of {p} points")
    path = [int(i), int(k)]
    for arg in reversed(back):
        k, i = int(arg[k, i]), k
        path.append(int(k))
    return path[::-1], best


def propagation_weights(teacher: Teacher) -> np.ndarray:
    """``w_j = (1 / alpha_j) * s / sqrt(s^2 + sigma_ve_j^2)`` per fine point (1 at the clean end):
    how much an error made at ``t_j`` survives to the endpoint under the probability-flow ODE of
    Gaussian data with the teacher endpoint's per-dimension std ``s`` (in VE coordinates the flow
    ``sigma_j -> 0`` scales a perturbation by ``s / sqrt(s^2 + sigma_j^2)``). Shape ``(P,)``."""
    ns = teacher.noise_schedule
    s = float(teacher.endpoint.double().std())
    t = teacher.t[:-1]
    w = s / torch.sqrt(s**2 + ns.sigma_ve(t) ** 2) / ns.alpha(t)
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0)  # alpha = 0 (a flow's t = 1) is never a step's end
    return torch.cat([w, torch.ones(1, dtype=torch.float64)]).numpy()


def gits_schedule(solver: Solver, teacher: Teacher, steps: int, denoise: Denoise | None = None,
                  progress: bool = False, costs: tuple[np.ndarray, np.ndarray] | None = None,
                  weighted: bool = True) -> tuple[Tensor, float]:
    """GITS: the ``steps`` evaluation times (a path through the teacher's fine grid) with the least
    summed local truncation error (module docstring), each error weighted by how much of it reaches
    the endpoint (:func:`propagation_weights`; ``weighted=False``: GITS's plain sum). Returns ``(t,
    summed local cost)``; ``t`` has shape ``(steps,)``, starts at the fine grid's first time and is
    strictly decreasing. ``costs``: :func:`local_costs` already computed for this solver and teacher."""
    first, cost = costs if costs is not None else local_costs(solver, teacher, denoise, progress)
    if weighted:
        w = propagation_weights(teacher)
        with np.errstate(invalid="ignore"):  # inf (no such step) * 0 stays inf
            first = np.where(np.isfinite(first), first * w, np.inf)
            cost = np.where(np.isfinite(cost), cost * w[None, None, :], np.inf)
    path, total = cheapest_path(first, cost, steps)
    return teacher.t[path[:-1]].clone(), total


# ---- LD3-style continuous optimisation ------------------------------------------------------------
@dataclass(frozen=True)
class LogSigmaParams:
    """The free times of an ``N``-step grid as softmax weights of log-sigma increments:
    ``u = top - (top - bottom) * cumsum(softmax(theta))``, ``u = log(sigma / alpha)`` between the
    noise schedule's ends ``top = u(t_max_finite)`` and ``bottom = u(t_min)``. Any ``theta`` gives
    strictly decreasing times in range.

    ``free_start=False``: ``t_0 = t_max``, ``theta`` has ``N`` entries and the first ``N - 1``
    cumulative sums place ``t_1 .. t_{N-1}`` (the last weight is the gap left above ``t_min``).
    ``free_start=True``: ``theta`` has ``N + 1`` entries and the first ``N`` cumulative sums place
    ``t_0 .. t_{N-1}``: the first time may lie below ``t_max`` (as the ``leading`` and
    ``ddim_uniform`` schedules start; the noise is then drawn there)."""

    ns: NoiseSchedule
    steps: int
    free_start: bool = False

    @property
    def bounds(self) -> tuple[float, float]:
        lo, hi = self.ns.sigma_ve_range()
        return math.log(hi), math.log(lo)

    @property
    def size(self) -> int:
        return self.steps + 1 if self.free_start else self.steps

    def times(self, theta: np.ndarray) -> Tensor:
        top, bottom = self.bounds
        w = np.exp(theta - theta.max())
        w = w / w.sum()
        cum = np.cumsum(w)
        u = top - (top - bottom) * (cum[: self.steps] if self.free_start else cum[: self.steps - 1])
        t_rest = self.ns.t_from_sigma_ve(torch.exp(torch.tensor(u, dtype=torch.float64))).clamp(self.ns.t_min,
                                                                                                  self.ns.t_max)
        if self.free_start:
            return t_rest
        return torch.cat([torch.tensor([float(self.ns.t_max)], dtype=torch.float64), t_rest])

    def theta(self, t_eval: Tensor, min_start_gap: float = 0.02, min_gap: float = 0.02) -> np.ndarray:
        """The parameters of a grid (inverse of :meth:`times` up to clipping). Fixed start: the grid
        starts at ``t_max``. Every gap is raised to at least ``min_gap`` of the range (the first one,
        with a free start, to ``min_start_gap``): a grid touching an end of the range (``t_0 =
        t_max``, or a last time at ``t_min`` as ``exponential`` has) would otherwise give a softmax
        weight near 0 that unit simplex steps in ``theta`` cannot move."""
        top, bottom = self.bounds
        t_all = torch.as_tensor(t_eval, dtype=torch.float64)
        t_free = t_all if self.free_start else t_all[1:]
        u = torch.log(self.ns.sigma_ve(t_free)).numpy() if t_free.numel() else np.zeros(0)
        u = np.clip(u, bottom, top)
        edges = np.concatenate([[top], u, [bottom]])
        gaps = np.maximum(-np.diff(edges), min_gap * (top - bottom))
        if self.free_start:
            gaps[0] = max(gaps[0], min_start_gap * (top - bottom))
        return np.log(gaps / gaps.sum())


def starts_at_t_max(ns: NoiseSchedule, t: Tensor) -> bool:
    """Whether the grid ``t`` (noisiest first) starts at ``ns.t_max`` (relative tolerance 1e-9)."""
    return abs(float(t[0]) - float(ns.t_max)) <= 1e-9 * max(1.0, abs(float(ns.t_max)))


def ld3_schedule(solver: Solver, denoise: Denoise, teacher: Teacher, steps: int, init: Tensor,
                 max_evals: int | None = None, progress: bool = False,
                 free_start: bool = False) -> tuple[Tensor, float, int]:
    """Minimise the endpoint RMSE against the teacher (whose trajectories start at ``t_max``) over
    the free times (:class:`LogSigmaParams`: ``t_1 .. t_{N-1}``, or with ``free_start`` also
    ``t_0 <= t_max``; Nelder-Mead from ``init``, a grid that starts at ``t_max`` unless
    ``free_start``).

    Returns:
        ``(t, objective, objective evaluations)``: the best grid seen (never worse than ``init``).
    """
    steps = check_steps(steps)
    check_deterministic(solver)
    ns = teacher.noise_schedule
    init = torch.as_tensor(init, dtype=torch.float64)
    base = endpoint_rmse(solver, denoise, teacher, init)
    at_max = starts_at_t_max(ns, init)
    if not free_start and not at_max:
        raise ValueError(f"with t_0 fixed the initial grid must start at t_max = {float(ns.t_max)}, got {float(init[0])}")
    # A grid starting at t_max is first refined with t_0 fixed (half the budget), then with t_0 free.
    stages = [LogSigmaParams(ns, steps, False)] if at_max else []
    if free_start:
        stages.append(LogSigmaParams(ns, steps, True))
    stages = [p for p in stages if p.size > 1]
    if not stages:
        return init, base, 1
    budget = max_evals if max_evals is not None else 40 * steps
    best = {"f": base, "t": init}
    bar = tqdm(total=budget, disable=not progress, leave=False, desc="ld3")
    evals = [1]

    for n, params in enumerate(stages):
        stop = budget if n == len(stages) - 1 else 1 + (budget - 1) // len(stages)

        objective = recorded_objective(lambda theta, params=params: {"t": params.times(theta)},
                                       lambda t: endpoint_rmse(solver, denoise, teacher, t), best, bar, evals)
        restarted_nelder_mead(objective, lambda params=params: params.theta(best["t"]), stop, evals)
    bar.close()
    return best["t"], best["f"], evals[0]


def recorded_objective(times: Callable[[np.ndarray], dict[str, Tensor]], score: Callable[..., float], best: dict,
                       bar: Any, evals: list[int]) -> Callable[[np.ndarray], float]:
    """The Nelder-Mead objective of the LD3 fits: ``score(**times(z))``, counted in ``evals[0]`` and
    on ``bar``; ``inf`` where the score raises ``ValueError`` (times collapsed onto each other by
    clamping) or is not finite; a new best is kept in ``best`` (``"f"`` and the fields of ``times``)."""

    def objective(z: np.ndarray) -> float:
        evals[0] += 1
        bar.update()
        fields = times(z)
        try:
            f = score(**fields)
        except ValueError:
            return float("inf")
        if not math.isfinite(f):
            return float("inf")
        if f < best["f"]:
            best.update(f=f, **fields)
            bar.set_postfix(rmse=f"{f:.4g}")
        return f

    return objective


def restarted_nelder_mead(objective: Callable[[np.ndarray], float], start: Callable[[], np.ndarray], stop: int,
                          evals: list[int], xatol: float = 1e-3) -> None:
    """scipy Nelder-Mead from ``start()`` with a unit simplex, restarted from ``start()`` (the best
    point so far, which ``objective`` records) with half the simplex whenever it converges early,
    until ``evals[0]`` (counted by ``objective``) reaches ``stop`` or the simplex is below 0.05."""
    from scipy.optimize import minimize

    z, scale = start(), 1.0
    while evals[0] < stop and scale > 0.05:
        simplex = np.vstack([z] + [z + scale * np.eye(z.size)[k] for k in range(z.size)])
        minimize(objective, z, method="Nelder-Mead",
                 options={"maxfev": stop - evals[0], "initial_simplex": simplex, "xatol": xatol, "fatol": 1e-7})
        z, scale = start(), scale / 2


@dataclass(frozen=True)
class DecoupledParams:
    """A grid and its decoupled model times (LD3's two parameter sets, arXiv 2405.15506, official code
    ``discretize_model_wrapper``) as one vector ``z = (theta, phi)``: ``theta`` places the grid
    (:class:`LogSigmaParams`); ``phi`` (``N - 1`` entries) moves the model time of every grid point
    but the first, in ``u = log(sigma / alpha)``: ``u'_i = u_i + window * g * tanh(phi_i)``, ``g`` the
    grid's smallest gap in ``u`` (LD3 clamps its shift to ``window`` times the smallest step; the
    ``tanh`` keeps the bound smooth for Nelder-Mead). With ``window <= 0.5`` the model times stay
    strictly decreasing."""

    grid: LogSigmaParams
    window: float = 0.5

    @property
    def size(self) -> int:
        return self.grid.size + self.grid.steps - 1

    def _reach(self, t: Tensor) -> tuple[Tensor, float]:
        u = torch.log(self.grid.ns.sigma_ve(t))
        gaps = (u[:-1] - u[1:]).abs()
        return u, self.window * (float(gaps.min()) if gaps.numel() else 0.0)

    def times(self, z: np.ndarray) -> tuple[Tensor, Tensor]:
        """``(t, t_model)``, both ``(N,)`` float64, noisiest first."""
        ns = self.grid.ns
        t = self.grid.times(z[: self.grid.size])
        u, reach = self._reach(t)
        shift = torch.zeros_like(u)
        shift[1:] = reach * torch.tanh(torch.as_tensor(z[self.grid.size:], dtype=torch.float64))
        t_model = ns.t_from_sigma_ve(torch.exp(u + shift)).clamp(ns.t_min, ns.t_max)
        t_model[0] = t[0]
        return t, t_model

    def z(self, t: Tensor, t_model: Tensor) -> np.ndarray:
        """The parameters of ``(t, t_model)`` (inverse of :meth:`times` up to clipping)."""
        u, reach = self._reach(t)
        u_model = torch.log(self.grid.ns.sigma_ve(t_model))
        frac = ((u_model - u)[1:] / reach).numpy() if reach > 0 else np.zeros(self.grid.steps - 1)
        return np.concatenate([self.grid.theta(t), np.arctanh(np.clip(frac, -0.999, 0.999))])


def ld3_decoupled(solver: Solver, denoise: Denoise, teacher: Teacher, steps: int, init: Tensor,
                  max_evals: int | None = None, free_start: bool = False, window: float = 0.5,
                  progress: bool = False) -> tuple[Tensor, Tensor, float, int]:
    """LD3 with decoupled model times: minimise the endpoint RMSE against the teacher jointly over the
    grid's free times and the model time at each grid point but the first
    (:class:`DecoupledParams`), Nelder-Mead from the grid ``init`` with model times equal to it
    (so the result is never worse than ``init``, typically :func:`ld3_schedule`'s grid).

    Args:
        max_evals: objective evaluations (default ``80 * steps``), each one solver run of ``steps``
            model evaluations on the teacher's noises.
        free_start: the first grid time is free (``<= t_max``) as well; else ``init`` must start at
            ``t_max`` and stays there.
        window: the model time of grid point ``i`` stays within ``window`` times the grid's smallest
            log-sigma gap of ``t_i`` (``0 < window <= 0.5``; LD3's default 0.5).

    Returns:
        ``(t, t_model, objective, objective evaluations)``: the best seen; ``t`` and ``t_model`` ``(N,)``.

    Raises:
        ValueError: ``window`` outside ``(0, 0.5]``; a fixed start with ``init`` not at ``t_max``.
    """
    steps = check_steps(steps)
    check_deterministic(solver)
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= 0.5:
        raise ValueError(f"window must be a number in (0, 0.5], got {window!r}")
    ns = teacher.noise_schedule
    init = torch.as_tensor(init, dtype=torch.float64)
    if not free_start and not starts_at_t_max(ns, init):
        raise ValueError(f"with t_0 fixed the initial grid must start at t_max = {float(ns.t_max)}, got {float(init[0])}")
    best = {"f": endpoint_rmse(solver, denoise, teacher, init), "t": init, "t_model": init.clone()}
    params = DecoupledParams(LogSigmaParams(ns, steps, free_start), float(window))
    evals = [1]
    if steps < 2:
        return best["t"], best["t_model"], best["f"], evals[0]
    budget = max_evals if max_evals is not None else 80 * steps
    bar = tqdm(total=budget, disable=not progress, leave=False, desc="ld3 decoupled")

    objective = recorded_objective(lambda z: dict(zip(("t", "t_model"), params.times(z))),
                                   lambda t, t_model: endpoint_rmse(solver, denoise, teacher, t, t_model),
                                   best, bar, evals)
    restarted_nelder_mead(objective, lambda: params.z(best["t"], best["t_model"]), budget, evals, xatol=1e-4)
    bar.close()
    return best["t"], best["t_model"], best["f"], evals[0]


def sample_errors(solver: Solver, denoise: Denoise, ns: NoiseSchedule, noise: Tensor, endpoint: Tensor,
                  t_eval: Tensor) -> Tensor:
    """Per-sample RMS distance ``sqrt(mean_d (x - endpoint)^2)`` of the solver's endpoints on
    ``t_eval`` from ``endpoint``. Shape ``(B,)``, float64."""
    return per_sample_ms(run_solver(solver, denoise, ns, noise, t_eval), endpoint).sqrt()


def stratify(errors: Tensor, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A stratified calibration set of ``num_samples`` noises out of a pool of ``P``, for objectives
    that a few samples dominate (e.g. the rare noises that a coarse grid sends into another mixture
    component: with ``P`` plain calibration noises such an objective varies from set to set and a
    fitted grid over-fits the set).

    Stratum 1 is the ``k = num_samples // 2`` pool samples with the largest score ``max_g
    errors[g, i] / median_i(errors[g])`` (the probe grids' per-sample errors), taken whole with
    weight 1; stratum 2 is ``m = num_samples - k`` samples drawn uniformly without replacement from
    the other ``P - k``, each with weight ``(P - k) / m``. The strata are fixed before any grid is
    fitted, so the weighted mean square of any grid over the set is an unbiased estimate of its mean
    square over the pool (stratified sampling: Cochran, *Sampling Techniques*, 3rd ed., ch. 5).

    Args:
        errors: ``(G, P)`` per-sample errors of ``G >= 1`` probe grids on the pool
            (:func:`sample_errors`); non-finite entries count as the largest.
        num_samples: the set's size, ``2 <= num_samples < P``.
        generator: for stratum 2's draw.

    Returns:
        ``(index, weights)``: pool indices (stratum 1 first) and float64 weights, both ``(num_samples,)``.

    Raises:
        ValueError: ``errors`` not 2-D, or ``num_samples`` outside ``[2, P)``.
    """
    if errors.dim() != 2 or errors.shape[0] < 1:
        raise ValueError(f"errors must have shape (probe grids, pool), got {tuple(errors.shape)}")
    pool = errors.shape[1]
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 2 <= num_samples < pool:
        raise ValueError(f"a stratified set needs 2 <= num_samples < pool ({pool}), got {num_samples!r}")
    e = torch.nan_to_num(errors.double(), nan=float("inf"))
    med = e.median(dim=1, keepdim=True).values.clamp_min(torch.finfo(torch.float64).tiny)
    score = (e / med).max(dim=0).values
    order = torch.argsort(score, descending=True, stable=True)
    k = num_samples // 2
    m = num_samples - k
    rest = order[k:]
    drawn = rest[torch.randperm(rest.numel(), generator=generator)[:m]]
    index = torch.cat([order[:k], drawn])
    weights = torch.cat([torch.ones(k, dtype=torch.float64),
                         torch.full((m,), (pool - k) / m, dtype=torch.float64)])
    return index, weights


def builtin_grids(schedules: dict[str, Callable[[NoiseSchedule, int], Tensor]], ns: NoiseSchedule,
                  steps: int) -> dict[str, Tensor]:
    """The ``steps``-point grid of each named step schedule under ``ns``; a schedule that cannot
    produce one here (``ValueError``) is left out, and its warnings (e.g. csflow's note on its default
    spectrum) are silenced."""
    import warnings

    out = {}
    for name, schedule in schedules.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = schedule(ns, steps)
        except ValueError:
            continue
    return out


def builtin_objectives(solver: Solver, denoise: Denoise, teacher: Teacher,
                       schedules: dict[str, Callable[[NoiseSchedule, int], Tensor]], steps: int) -> dict[str, float]:
    """Endpoint RMSE against the teacher of each named step schedule (``inf`` where it cannot
    produce a grid for this noise schedule)."""
    grids = builtin_grids(schedules, teacher.noise_schedule, steps)
    out = {}
    for name in schedules:
        try:
            out[name] = endpoint_rmse(solver, denoise, teacher, grids[name]) if name in grids else float("inf")
        except ValueError:
            out[name] = float("inf")
    return out
