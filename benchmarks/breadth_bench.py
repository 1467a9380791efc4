#!/usr/bin/env python
"""Issue 17 (breadth): every registered deterministic solver x the step schedules that make sense
for it, on the exact Gaussian mixtures (trajectory RMSE, NFE 5-20) and on the bundled MNIST model
(MNIST-FD, NFE 4-10), against today's best configurations measured in the same run.

Phases (``--phase``; cells go to ``--work/*.jsonl``, a rerun resumes; every command is appended to
``--work/commands.txt`` and listed in the report):

* ``gmm`` -- the two problems of ``benchmarks/gmm_solvers.py`` (SD's discrete VP process, the same
  seeded noises, its reference ODE solutions): every deterministic SOLVERS entry (SteinDiff presets
  left out: they are experimental and spend model evaluations beyond their NFE) plus ``deis:basis=tab``
  x ``GMM_SCHEDULES`` x NFE, and ``GMM_MULTISTEP`` x ``GMM_OPTION_SCHEDULES``. A solver runs the most
  steps whose ``nfe`` fits the budget (Heun: ``2 steps - 1``).
* ``gmm_opt`` -- ``GMM_OPT_SOLVERS`` x NFE with a schedule from the public ``diffsample.optimize_schedule``
  (LD3, 256 calibration noises from seed 10**12, disjoint from the evaluation noises), scored like the
  built-in rows; cells are keyed by a hash of the optimiser's source, the report takes the newest.
* ``gmm_big`` -- the configurations that start at ``t_max`` rescored on ``--big-samples`` (16,384) other
  held-out noises per problem (``--big-problems``): the ``--big-top`` best pre-issue and best new built-in
  configurations per NFE by the 2,048-noise RMSE, and every optimised grid. Cells are keyed by the set's
  size (the committed run has 16,384 and 65,536; the larger set starts with the smaller one's noises), and
  the report gives each set its table with the flip-count ratio and its exact 95% interval. The RMSE of a
  few thousand noises is dominated by the few that end in another mixture component (on ``64d`` one of 2,048 adds
  about 0.016), so the ratio at high NFE is re-measured on more noises.
* ``screen`` -- MNIST-FD at NFE 5, N = ``--screen-samples`` (250), seed 0, for ``--screen-solvers`` x
  ``MNIST_SCHEDULES`` (the first solver x ``MNIST_SCHEDULES_ALL``): to pick the configurations worth N = 1,000.
* ``sweep`` -- MNIST-FD at N = 1,000 (``sweep``'s docstring; the committed sizing is ``SIZING_NOTE``): every
  solver x its ``--per-solver`` best screened schedules at NFE 5, narrower sets at the other NFE, then the
  seed sets 100000 and 200000 for the best configurations per NFE and ``unipc_bh2 / leading``.
* ``full`` / ``seeds`` -- the first run's MNIST phases (the ``--top`` screened configurations; kept so its
  commands still reproduce).
* ``report`` -- ``breadth_{gmm,mnist}.json``, ``breadth.md`` (best configuration per NFE, ratios to
  today's best, full tables) and ``breadth.png`` into ``--out``.

"Today's best" is the best configuration over the solvers and schedules that existed before issue 17
(``BEFORE_SOLVERS`` x ``BEFORE_SCHEDULES``, karras / polyexponential with any option), rerun in the same
phase. Usage (``all`` approximates the committed run; its exact commands are in the report)::

    OMP_NUM_THREADS=1 python benchmarks/breadth_bench.py --phase all --out benchmarks/results

The committed results ran the phases one by one on a shared 2-core CPU (``nice -n 5``);
``benchmarks/results/breadth.md`` lists the exact commands.

This is a script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gmm_solvers import NOISE_SEEDS, PROBLEMS, SD_BETAS, References, mode_flips, rmse  # noqa: E402

from diffsample.samplers import Sampler  # noqa: E402
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, DiscreteVP  # noqa: E402
from diffsample.testbed.gmm import GaussianMixture  # noqa: E402

# uni_pc / uni_pc_bh2 (new names) are the pre-issue specs unipc_bh1/bh2:predictor_order=3.
BEFORE_SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc_bh1", "unipc_bh2", "uni_pc", "uni_pc_bh2",
                  "dpmpp_3m:third_order=reference")
BEFORE_SCHEDULES = ("karras", "exponential", "linspace", "leading", "trailing", "polyexponential:rho=2", "csflow")
GMM_SCHEDULES = ("karras", "exponential", "linspace", "leading", "trailing", "polyexponential:rho=2", "simple",
                 "normal", "sgm_uniform", "ddim_uniform", "beta", "kl_optimal", "laplace", "vp", "align_your_steps",
                 "align_your_steps:model=sdxl", "gits", "gits:coeff=1.1", "gits:coeff=1.3", "linear_quadratic")
# Option variants of pre-issue schedules (so 'before' for the solvers that existed): tried on the multistep solvers
# of order >= 3 only, for the GMM cells the first run left short of 1.2x.
GMM_OPTION_SCHEDULES = ("karras:rho=5", "polyexponential:rho=1.5")
GMM_MULTISTEP = ("dpmpp_3m", "unipc_bh1", "unipc_bh2", "uni_pc", "uni_pc_bh2", "ipndm", "ipndm_v", "deis",
                 "deis:basis=tab", "lms")
# Built-in solver + per-model optimised schedule (diffsample.optimize_schedule, LD3 started from the better of
# GITS and the best built-in; 256 calibration noises from CALIBRATION_SEED, disjoint from the evaluation noises).
GMM_OPT_SOLVERS = ("unipc_bh2", "uni_pc", "deis", "ipndm", "dpmpp_2m")
GMM_OPT_METHOD = "ld3"
GMM_OPT_CALIB = 256
GMM_NFES = (5, 6, 8, 10, 15, 20)
# The screen (NFE 5, N = 250, seed 0): every deterministic solver (ipndm first, screened on every schedule).
MNIST_SOLVERS = ("ipndm", "unipc_bh2", "uni_pc_bh2", "dpmpp_3m", "deis", "ipndm_v", "deis:basis=tab", "lms", "uni_pc",
                 "unipc_bh1", "dpmpp_2m", "res_multistep", "gradient_estimation", "heunpp2", "euler", "heun", "dpm_2")
# The screen's schedules: ipndm's first row measured all 13 of these; the seven that failed badly at NFE 5
# on this model (trailing, karras, beta, laplace, vp, kl_optimal: FD 66-316, all start at sigma ~157) are
# left out for the other solvers, keeping sgm_uniform as the one uniform-to-the-top representative.
MNIST_SCHEDULES_ALL = ("leading", "trailing", "karras", "align_your_steps", "gits", "gits:coeff=1.1", "kl_optimal",
                       "beta", "sgm_uniform", "ddim_uniform", "laplace", "vp", "csflow")
MNIST_SCHEDULES = ("leading", "align_your_steps", "gits", "gits:coeff=1.1", "ddim_uniform", "csflow")
MNIST_NFES = (4, 5, 6, 8, 10)
BASELINES = (("unipc_bh2", "leading"), ("unipc_bh2", "csflow"))
SIZING_NOTE = """### What the MNIST part ran, and what it did not

The issue asks every deterministic solver x the schedules that make sense for it at NFE 4, 5, 6, 8, 10, N = 1,000,
three seed sets. On a shared 2-core CPU (~70 CPU-minutes for MNIST) that was sized as follows (commands above):

1. Screen, NFE 5, N = 250, seed set 0: all 17 deterministic solvers (`MNIST_SOLVERS`) x leading, align_your_steps,
   gits, gits:coeff=1.1, ddim_uniform, csflow; `ipndm` also x trailing, karras, kl_optimal, beta, sgm_uniform,
   laplace and vp (MNIST-FD 66-316: the grids that start at VE sigma ~157 fail at 5 steps on this model, so they
   were not screened for the other solvers).
2. NFE 5, N = 1,000, seed set 0: every solver x its two best screened schedules, plus `unipc_bh2 / leading`
   (today's best) and `unipc_bh2 / csflow`.
3. NFE 4 and 6, seed set 0: each solver's better configuration at NFE 5 (one per solver) plus the two baselines.
4. NFE 8 and 10, seed set 0: the configurations of step 3 within 1.5x of the best FD at NFE 6, plus the baselines.
5. Seed sets 100000 and 200000: at NFE 5 the three best configurations of seed set 0 plus `unipc_bh2 / leading`;
   at NFE 4, 6, 8 and 10 the two best plus `unipc_bh2 / leading`.

6. Completed in a later round (the `--narrow-nfe '' --best-only-nfe '' --seed-top 100` sweep lines): every
   configuration of step 2 (35: each solver x its two best screened schedules, plus the baselines) at NFE 4, 5, 6,
   8 and 10 on all three seed sets, 525 cells.

Not run: schedules outside the six above for 16 of the 17 solvers; the stochastic solvers (no convergence order).
The best-by-seed-0 choice favours configurations that were lucky on seed set 0; the 3-set means are the numbers to
quote.

`uni_pc_bh2` against `unipc_bh2` (and `uni_pc` against `unipc_bh1`): the same algorithm with predictor order 3
instead of 2. With `lower_order_final` (the default, diffusers' rule) step `i` of `N` uses order
`min(3, i + 1, N - i)`, which is at most 2 for `N <= 4`: the two are identical there by design (NFE 4 csflow above:
both 2.40; on the GMM the outputs agree bit for bit at 2-4 steps). From 5 steps they differ (at 5 steps only the
middle step is order 3: MNIST-FD 3.7758 against 3.7761 on `leading`, N = 250; 0.838 against 0.876 on `csflow`,
N = 1,000)."""
SEED_SETS = (0, 100_000, 200_000)
EXCLUDED_SOLVER_PREFIXES = ("stein",)


def deterministic_solvers() -> tuple[list[str], list[str]]:
    """Every deterministic registered solver with a convergence order (SteinDiff presets left out),
    plus the pre-issue variants of BEFORE_SOLVERS; and the names left out."""
    specs, skipped = [], []
    for name in SOLVERS.names():
        solver = SOLVERS.create(name)
        if solver.stochastic or solver.order <= 0 or name.startswith(EXCLUDED_SOLVER_PREFIXES):
            skipped.append(name)
        else:
            specs.append(name)
    extra = [s for s in BEFORE_SOLVERS + ("deis:basis=tab",) if s not in specs]
    return specs + extra, skipped


def steps_for_nfe(solver_spec: str, schedule_spec: str, ns, nfe: int) -> int | None:
    """The most steps whose ``solver.nfe`` is at most ``nfe`` (None: not even one step fits)."""
    solver, schedule = SOLVERS.create(solver_spec), STEP_SCHEDULES.create(schedule_spec)
    for steps in range(nfe, 0, -1):
        try:
            grid = Sampler(solver, schedule, steps).grid(ns)
        except ValueError:
            continue
        if solver.nfe(grid) <= nfe:
            return steps
    return None


def is_before(solver: str, schedule: str) -> bool:
    """A configuration that existed before issue 17 (option variants of karras / polyexponential included)."""
    family = schedule.split(":")[0]
    return solver in BEFORE_SOLVERS and (schedule in BEFORE_SCHEDULES or family in ("karras", "polyexponential"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---- GMM --------------------------------------------------------------------------------------
def phase_gmm(args, log) -> None:
    path = args.work / "gmm.jsonl"
    done = {(c["problem"], c["solver"], c["schedule"], c["nfe_target"]) for c in read_jsonl(path)}
    ns = DiscreteVP.from_config(SD_BETAS)
    solvers, _ = deterministic_solvers()
    with open(path, "a") as fh:
        for pname, pcfg in PROBLEMS.items():
            gmm = GaussianMixture.random(**pcfg)
            noise = torch.randn(args.gmm_samples, pcfg["dim"], dtype=torch.float64,
                                generator=torch.Generator().manual_seed(NOISE_SEEDS[pname]))
            refs = References(gmm, ns, noise, 1e-10, args.ref_cache, pname)
            start = time.perf_counter()
            pairs = [(so, sc) for so in solvers for sc in GMM_SCHEDULES]
            pairs += [(so, sc) for so in GMM_MULTISTEP for sc in GMM_OPTION_SCHEDULES]
            for nfe in GMM_NFES:
                for solver, schedule in pairs:
                    if (pname, solver, schedule, nfe) in done:
                        continue
                    cell = dict(problem=pname, solver=solver, schedule=schedule, nfe_target=nfe,
                                samples=args.gmm_samples, before=is_before(solver, schedule))
                    try:
                        steps = steps_for_nfe(solver, schedule, ns, nfe)
                        if steps is None:
                            raise ValueError(f"no step count fits NFE {nfe}")
                        out = Sampler(SOLVERS.create(solver), STEP_SCHEDULES.create(schedule), steps)(
                            gmm.denoiser(ns), noise)
                        t0 = round(out.grid.t_list[0], 6)
                        ref = refs(t0)
                        finite = bool(torch.isfinite(out.x).all())
                        cell.update(steps=steps, nfe=out.nfe, t0=t0,
                                    rmse=rmse(out.x, ref) if finite else float("nan"))
                    except Exception as exc:  # a failing configuration is a result
                        cell.update(steps=None, nfe=None, t0=None, rmse=float("nan"), error=repr(exc)[:300])
                    fh.write(json.dumps(cell) + "\n")
                    fh.flush()
                log(f"[gmm {pname}] NFE {nfe} done ({time.perf_counter() - start:.0f} s, {len(refs.refs)} references)")


def optimizer_version() -> str:
    """Short content hash of the schedule optimiser's two modules (cells are keyed by it: a rerun after a
    change to the optimiser makes new cells; the report takes the newest)."""
    import hashlib

    import diffsample.run.optimize as ro
    import diffsample.samplers.schedule_optimizer as so

    h = hashlib.sha256(Path(so.__file__).read_bytes() + Path(ro.__file__).read_bytes())
    return h.hexdigest()[:10]


def opt_label(args) -> str:
    """The schedule column of an optimised cell: the method, ``+pool`` for a stratified calibration set,
    ``+decoupled`` for LD3 with decoupled model times, ``,fit=BofP`` for a pool other than 1,024 of
    16,384 (no ``/``: the label is part of a file name), ``,t0=t_max`` when the first time is kept at t_max."""
    return (f"optimised:{GMM_OPT_METHOD}" + ("+pool" if args.opt_pool else "")
            + ("+decoupled" if args.opt_decoupled else "")
            + (f",fit={args.opt_calib}of{args.opt_pool}" if args.opt_pool and (args.opt_calib, args.opt_pool)
               != (1024, 16384) else "")
            + (",t0=t_max" if args.opt_fixed_start else "")
            + (f",evals={args.opt_max_evals}" if args.opt_max_evals else ""))


def phase_gmm_opt(args, log) -> None:
    """GMM_OPT_SOLVERS (or ``--opt-solvers``) x NFE with a schedule from ``diffsample.optimize_schedule``
    (public API) per problem, solver and NFE, scored on the same evaluation noises and references as the
    built-in rows. ``--opt-calib`` calibration noises (from ``--opt-pool`` by stratification when given),
    ``--opt-fixed-start`` keeps t_0 = t_max."""
    from diffsample import optimize_schedule
    from diffsample.run.optimize import CALIBRATION_SEED, calibration_teacher

    path = args.work / "gmm_opt.jsonl"
    version = optimizer_version()
    label = opt_label(args)
    solvers = args.opt_solvers.split(",") if args.opt_solvers else list(GMM_OPT_SOLVERS)
    nfes = [int(v) for v in args.opt_nfe.split(",")] if args.opt_nfe else list(GMM_NFES)
    problems = args.opt_problems.split(",") if args.opt_problems else list(PROBLEMS)
    calib = args.opt_calib
    done = {(c["problem"], c["solver"], c["nfe_target"], c["optimizer_version"], c["schedule"])
            for c in read_jsonl(path)}
    ns = DiscreteVP.from_config(SD_BETAS)
    with open(path, "a") as fh:
        for pname in problems:
            pcfg = PROBLEMS[pname]
            todo = [(s, n) for s in solvers for n in nfes if (pname, s, n, version, label) not in done]
            if not todo:
                continue
            gmm = GaussianMixture.random(**pcfg)
            den = gmm.denoiser(ns)
            noise = torch.randn(args.gmm_samples, pcfg["dim"], dtype=torch.float64,
                                generator=torch.Generator().manual_seed(NOISE_SEEDS[pname]))
            refs = References(gmm, ns, noise, 1e-10, args.ref_cache, pname)
            cpu0 = time.process_time()
            teacher = None if args.opt_pool else calibration_teacher(den, num_samples=calib, seed=CALIBRATION_SEED)
            teacher_cpu = time.process_time() - cpu0
            for solver, nfe in todo:
                cell = dict(problem=pname, solver=solver, schedule=label, nfe_target=nfe,
                            samples=args.gmm_samples, before=False, optimizer_version=version,
                            calibration=dict(num_samples=calib, seed=CALIBRATION_SEED, pool=args.opt_pool),
                            fixed_start=args.opt_fixed_start, teacher_cpu_s=round(teacher_cpu, 2))
                extra = dict(pool=args.opt_pool) if args.opt_pool else dict(teacher=teacher)
                try:
                    sched = optimize_schedule(den, solver=solver, steps=nfe, method=GMM_OPT_METHOD,
                                              num_samples=calib, seed=CALIBRATION_SEED, max_evals=args.opt_max_evals,
                                              free_start=not args.opt_fixed_start, **extra,
                                              decoupled=args.opt_decoupled,
                                              command=f"optimize_schedule(gmm {pname}, solver={solver!r}, steps={nfe}, "
                                                      f"method={GMM_OPT_METHOD!r}, num_samples={calib}"
                                                      + (f", pool={args.opt_pool}" if args.opt_pool else "")
                                                      + (f", max_evals={args.opt_max_evals}" if args.opt_max_evals
                                                         else "")
                                                      + (", decoupled=True" if args.opt_decoupled else "")
                                                      + (", free_start=False)" if args.opt_fixed_start else ")"))
                    tag = label.replace(":", "_").replace(",", "_").replace("=", "").replace("/", "_")
                    sched.save(args.work / f"opt_{pname}_{solver}_{nfe}_{tag}_{version}.json")
                    out = Sampler(SOLVERS.create(solver), sched, nfe)(den, noise)
                    t0 = round(out.grid.t_list[0], 6)
                    finite = bool(torch.isfinite(out.x).all())
                    cell.update(steps=nfe, nfe=out.nfe, t0=t0, t=list(sched.t), objective=sched.objective,
                                t_model=None if sched.t_model is None else list(sched.t_model),
                                best_builtin_objective=list(sched.best_builtin or ()),
                                cpu_s=sched.extra.get("cpu_seconds"), init=sched.extra.get("ld3_init"),
                                rmse=rmse(out.x, refs(t0)) if finite else float("nan"))
                except Exception as exc:  # a failing configuration is a result
                    cell.update(steps=None, nfe=None, t0=None, rmse=float("nan"), error=repr(exc)[:300])
                fh.write(json.dumps(cell) + "\n")
                fh.flush()
                log(f"[gmm_opt {pname}] {solver} {label} NFE {nfe}: RMSE {cell['rmse']:.4g} ({cell.get('cpu_s')} CPU-s)"
                    + (f" {cell['error']}" if "error" in cell else ""))


BIG_SEED_OFFSET = 7777
"""Seed of the large evaluation set: ``NOISE_SEEDS[problem] + BIG_SEED_OFFSET`` (apart from the 2,048-noise
set and from the calibration seeds 10**12 ..)."""


def cell_key(c: dict) -> tuple:
    """What tells two GMM cells of one evaluation set apart: problem, solver, schedule, NFE, optimiser hash."""
    return c["problem"], c["solver"], c["schedule"], c["nfe_target"], c.get("optimizer_version")


def phase_gmm_big(args, log) -> None:
    """Rescore on a large held-out set (module docstring)."""
    from diffsample.samplers import schedule_optimizer as so

    path = args.work / "gmm_big.jsonl"
    done = {(*cell_key(c), c["samples"]) for c in read_jsonl(path)}
    ns = DiscreteVP.from_config(SD_BETAS)
    cells = [c for c in read_jsonl(args.work / "gmm.jsonl") if c.get("t0") is not None and c["t0"] >= T_MAX - 1e-6
             and math.isfinite(c["rmse"])]
    opt = [c for c in latest_opt_cells(args.work) if c.get("t0") is not None and c["t0"] >= T_MAX - 1e-6
           and math.isfinite(c["rmse"])]
    with open(path, "a") as fh:
        for pname in args.big_problems.split(","):
            pcfg = PROBLEMS[pname]
            gmm = GaussianMixture.random(**pcfg)
            den = gmm.denoiser(ns)
            noise = torch.randn(args.big_samples, pcfg["dim"], dtype=torch.float64,
                                generator=torch.Generator().manual_seed(NOISE_SEEDS[pname] + BIG_SEED_OFFSET))
            ref = References(gmm, ns, noise, 1e-10, args.ref_cache, f"{pname}big")(T_MAX)
            jobs = []
            for nfe in GMM_NFES:
                here = [c for c in cells if c["problem"] == pname and c["nfe_target"] == nfe]
                before = sorted((c for c in here if c["before"]), key=lambda c: c["rmse"])[: args.big_top]
                now = sorted((c for c in here if not c["before"]), key=lambda c: c["rmse"])[: args.big_top]
                jobs += [(c, None) for c in before + now]
                jobs += [(c, c["t"]) for c in opt if c["problem"] == pname and c["nfe_target"] == nfe]
            for c, t in jobs:
                k = (*cell_key(c), args.big_samples)
                if k in done:
                    continue
                solver = SOLVERS.create(c["solver"])
                if t is None:
                    x = Sampler(solver, STEP_SCHEDULES.create(c["schedule"]), c["steps"])(den, noise).x
                else:
                    t_model = c.get("t_model")
                    x = so.run_solver(solver, den, ns, noise, torch.tensor(t, dtype=torch.float64),
                                      None if t_model is None else torch.tensor(t_model, dtype=torch.float64))
                cell = dict(problem=pname, solver=c["solver"], schedule=c["schedule"], nfe_target=c["nfe_target"],
                            steps=c["steps"], before=c["before"], optimizer_version=c.get("optimizer_version"),
                            samples=args.big_samples, rmse_2048=c["rmse"], rmse=rmse(x, ref),
                            flips=mode_flips(gmm, x, ref))
                fh.write(json.dumps(cell) + "\n")
                fh.flush()
                done.add(k)
                log(f"[gmm_big {pname}] {c['solver']} / {c['schedule']} NFE {c['nfe_target']}: RMSE {cell['rmse']:.4g} "
                    f"(2048 noises: {c['rmse']:.4g}; {cell['flips']} flips)")


def big_summary(cells: list[dict]) -> list[dict]:
    """Per (problem, NFE) on the large set: best pre-issue, best new built-in, best optimised."""
    rows = []
    for p in PROBLEMS:
        for nfe in GMM_NFES:
            here = [c for c in cells if c["problem"] == p and c["nfe_target"] == nfe]
            if not here:
                continue
            pick = {}
            for kind, test in (("before", lambda c: c["before"]),
                               ("builtin", lambda c: not c["before"] and not c["schedule"].startswith("optimised")),
                               ("optimised", lambda c: c["schedule"].startswith("optimised"))):
                group = [c for c in here if test(c)]
                pick[kind] = min(group, key=lambda c: c["rmse"]) if group else None
            now = min((c for c in (pick["builtin"], pick["optimised"]) if c), key=lambda c: c["rmse"])
            b = pick["before"]
            rows.append(dict(problem=p, nfe=nfe, samples=here[0]["samples"], before=b, builtin=pick["builtin"],
                             optimised=pick["optimised"], now=now, ratio=b["rmse"] / now["rmse"] if b else None))
    return rows


def big_table(rows: list[dict]) -> list[str]:
    def cfg(c):
        return "-" if c is None else f"{c['solver']} / {c['schedule']}"

    def val(c):
        return "-" if c is None else f"{fmt(c['rmse'])} ({c['flips']})"

    return ratio_table("| problem | NFE | best pre-issue | RMSE (flips) | best new built-in | RMSE (flips) | "
                       "best optimised | RMSE (flips) | flips before / now (95% CI) |", rows,
                       lambda r: f"{cfg(r['before'])} | {val(r['before'])} | {cfg(r['builtin'])} | "
                                 f"{val(r['builtin'])} | {cfg(r['optimised'])} | {val(r['optimised'])} | "
                                 f"{flip_ratio(r['before'], r['now'])}",
                       "cells of this set")


def flip_ratio(before: dict | None, now: dict | None) -> str:
    """Flip count ratio before / now with an exact 95% interval: given ``k_before + k_now`` flips on the
    same noises, ``k_now`` is binomial with ``p = rate_now / (rate_now + rate_before)`` (Clopper-Pearson)."""
    if before is None or now is None or before["flips"] + now["flips"] == 0:
        return "-"
    from scipy.stats import binomtest

    kb, kn = before["flips"], now["flips"]
    ci = binomtest(kn, kb + kn).proportion_ci(0.95)
    lo = (1 - ci.high) / ci.high
    hi = math.inf if ci.low == 0 else (1 - ci.low) / ci.low
    return f"{fmt(kb / kn) if kn else 'inf'} ({fmt(lo)}-{fmt(hi) if math.isfinite(hi) else 'inf'})"


def ratio_table(head: str, rows: list[dict], middle, cells_word: str) -> list[str]:
    """A markdown table ``head + before / now + >= 1.2x`` (``middle(row)`` fills the columns between the
    problem / NFE and the ratio) and the count of cells that meet the 1.2x target."""
    out = [head + " before / now | >= 1.2x |", "|---" * (head.count("|") + 1) + "|"]
    for r in rows:
        ok = r["ratio"] is not None and r["ratio"] >= 1.2
        out.append(f"| {r['problem']} | {r['nfe']} | {middle(r)} | {fmt(r['ratio'])} | {'yes' if ok else 'no'} |")
    met = sum(r["ratio"] is not None and r["ratio"] >= 1.2 for r in rows)
    return out + ["", f"Target (>= 1.2x over the best pre-issue configuration per NFE) met in {met} of {len(rows)} "
                      f"{cells_word}."]


def latest_opt_cells(work: Path) -> list[dict]:
    """The newest optimised cell per (problem, solver, schedule label, NFE)."""
    newest = {}
    for c in read_jsonl(work / "gmm_opt.jsonl"):
        newest[(c["problem"], c["solver"], c["schedule"], c["nfe_target"])] = c
    return list(newest.values())


# ---- MNIST ------------------------------------------------------------------------------------
_MODEL = None


def mnist_cell(solver: str, schedule: str, nfe: int, seed: int, n: int, args) -> dict:
    global _MODEL
    from diffsample.run.generate import generate
    from diffsample.run.models import load_model
    from diffsample.testbed.mnist import class_accuracy, mnist_fd

    if _MODEL is None:
        _MODEL = load_model("mnist")
    ns = _MODEL.denoiser.noise_schedule
    cell = dict(solver=solver, schedule=schedule, nfe_target=nfe, seed=seed, num_samples=n,
                before=is_before(solver, schedule))
    start = time.perf_counter()
    try:
        steps = steps_for_nfe(solver, "trailing" if schedule == "csflow" else schedule, ns, nfe)
        if steps is None:
            raise ValueError(f"no step count fits NFE {nfe}")
        res = generate(_MODEL, solver=solver, schedule=schedule, steps=steps, seed=seed, num_samples=n,
                       batch_size=args.batch_size)
        x = res.samples.clamp(-1, 1)
        fd = mnist_fd(x)
        cell.update(steps=steps, nfe=res.record["nfe"], mnist_fd=fd if math.isfinite(fd) else float("nan"),
                    class_accuracy=class_accuracy(x, torch.as_tensor(res.record["classes"])))
    except Exception as exc:
        cell.update(steps=None, nfe=None, mnist_fd=float("nan"), error=repr(exc)[:300])
    cell["wall_s"] = round(time.perf_counter() - start, 2)
    return cell


def run_mnist(jobs, args, log) -> None:
    path = args.work / "mnist.jsonl"
    done = {(c["solver"], c["schedule"], c["nfe_target"], c["seed"], c["num_samples"]) for c in read_jsonl(path)}
    todo = [j for j in jobs if j not in done]
    log(f"{len(todo)} MNIST cells to run ({len(jobs) - len(todo)} done)")
    with open(path, "a") as fh:
        for solver, schedule, nfe, seed, n in todo:
            cell = mnist_cell(solver, schedule, nfe, seed, n, args)
            fh.write(json.dumps(cell) + "\n")
            fh.flush()
            log(f"{solver:>20s} {schedule:>28s} NFE {nfe:<3d} seed {seed:<6d} N {n:<5d} "
                f"FD {cell['mnist_fd']:.3f} ({cell['wall_s']:.0f} s){' ' + cell['error'] if 'error' in cell else ''}")


def ranked(cells, key=lambda c: c["mnist_fd"]):
    ok = [c for c in cells if isinstance(c.get("mnist_fd"), float) and math.isfinite(c["mnist_fd"])]
    return sorted(ok, key=key)


def screened_top(args) -> list[tuple[str, str]]:
    cells = [c for c in read_jsonl(args.work / "mnist.jsonl")
             if c["num_samples"] == args.screen_samples and c["seed"] == 0 and c["nfe_target"] == 5]
    top = []
    for c in ranked(cells):
        if (c["solver"], c["schedule"]) not in top:
            top.append((c["solver"], c["schedule"]))
    return top[:args.top]


def full_configs(args) -> list[tuple[str, str]]:
    configs = list(BASELINES)
    for cfg in screened_top(args):
        if cfg not in configs:
            configs.append(cfg)
    return configs


def seed_configs(args) -> list[tuple[str, str]]:
    cells = [c for c in read_jsonl(args.work / "mnist.jsonl")
             if c["num_samples"] == 1000 and c["seed"] == 0 and c["nfe_target"] == 5]
    configs = [BASELINES[0], BASELINES[1]]
    for c in ranked(cells):
        if (c["solver"], c["schedule"]) not in configs and len(configs) < 2 + args.seed_top:
            configs.append((c["solver"], c["schedule"]))
    return configs


def per_solver_configs(args) -> list[tuple[str, str]]:
    """Every screened solver x its ``--per-solver`` best schedules of the screen (NFE 5, N = 250, seed 0), plus
    the baselines."""
    cells = [c for c in read_jsonl(args.work / "mnist.jsonl")
             if c["num_samples"] == args.screen_samples and c["seed"] == 0 and c["nfe_target"] == 5]
    configs = list(BASELINES)
    for solver in MNIST_SOLVERS:
        for c in ranked([c for c in cells if c["solver"] == solver])[:args.per_solver]:
            if (solver, c["schedule"]) not in configs:
                configs.append((solver, c["schedule"]))
    return configs


def full_cells(args, nfe: int, seed: int) -> dict[tuple[str, str], dict]:
    return {(c["solver"], c["schedule"]): c for c in read_jsonl(args.work / "mnist.jsonl")
            if c["num_samples"] == 1000 and c["seed"] == seed and c["nfe_target"] == nfe}


def best_per_solver(args, configs, nfe: int) -> list[tuple[str, str]]:
    """Each solver's best of ``configs`` at ``nfe`` (seed set 0, N = 1,000), plus the baselines."""
    cells = full_cells(args, nfe, 0)
    out = list(BASELINES)
    for solver in MNIST_SOLVERS:
        mine = ranked([cells[c] for c in configs if c[0] == solver and c in cells])
        if mine and (solver, mine[0]["schedule"]) not in out:
            out.append((solver, mine[0]["schedule"]))
    return out


def sweep(args, log) -> None:
    """Seed set 0 at every ``--full-nfe`` (in that order), then seed sets 100000 / 200000 at every ``--seed-nfe``.

    Configurations at NFE ``n`` (seed set 0): at ``--ref-nfe`` (5) every screened solver x its ``--per-solver``
    best screened schedules (``per_solver_configs``); at ``--narrow-nfe`` each solver's better one at ``--ref-nfe``;
    at ``--best-only-nfe`` those of the narrow set within ``--within`` x the best FD at the largest narrow NFE
    below ``n``. Seed sets: the ``--seed-top`` best of seed set 0 at that NFE plus ``unipc_bh2 / leading``.
    """
    configs = per_solver_configs(args)
    narrow = {int(v) for v in args.narrow_nfe.split(",") if v}
    best_only = {int(v) for v in args.best_only_nfe.split(",") if v}
    for nfe in [int(v) for v in args.full_nfe.split(",") if v]:
        if nfe in narrow:
            here = best_per_solver(args, configs, args.ref_nfe)
        elif nfe in best_only:
            lower = max(n for n in narrow if n < nfe)
            prev = full_cells(args, lower, 0)
            cands = [c for c in best_per_solver(args, configs, args.ref_nfe) if c in prev]
            best = min(prev[c]["mnist_fd"] for c in cands)
            here = list(BASELINES) + [c for c in cands if prev[c]["mnist_fd"] <= args.within * best
                                      and c not in BASELINES]
        else:
            here = configs
        run_mnist([(s, sch, nfe, 0, 1000) for s, sch in here], args, log)
    for nfe in [int(v) for v in args.seed_nfe.split(",") if v]:
        top = [(c["solver"], c["schedule"]) for c in ranked(list(full_cells(args, nfe, 0).values()))][:args.seed_top]
        seeded = top + [BASELINES[0]] * (BASELINES[0] not in top)
        run_mnist([(s, sch, nfe, seed, 1000) for s, sch in seeded for seed in SEED_SETS[1:]], args, log)


# ---- report ------------------------------------------------------------------------------------
def fmt(v) -> str:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "fail"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.2e}"


T_MAX = 999.0


def gmm_summary(cells: list[dict], from_t_max: bool = False) -> list[dict]:
    """Best now and best before per (problem, NFE); ``from_t_max``: only runs whose first point is ``t_max``."""
    if from_t_max:
        cells = [c for c in cells if c.get("t0") is not None and c["t0"] >= T_MAX - 1e-6]
    rows = []
    for p in PROBLEMS:
        for nfe in GMM_NFES:
            here = [c for c in cells if c["problem"] == p and c["nfe_target"] == nfe and math.isfinite(c["rmse"])]
            if not here:
                continue
            best = min(here, key=lambda c: c["rmse"])
            before = [c for c in here
                      if is_before(c["solver"], c["schedule"]) and not c["schedule"].startswith("optimised")]
            best_before = min(before, key=lambda c: c["rmse"]) if before else None
            rows.append(dict(problem=p, nfe=nfe, best=f"{best['solver']} / {best['schedule']}", best_rmse=best["rmse"],
                             best_nfe=best["nfe"], best_t0=best.get("t0"),
                             before_t0=best_before.get("t0") if best_before else None,
                             before=f"{best_before['solver']} / {best_before['schedule']}" if best_before else None,
                             before_rmse=best_before["rmse"] if best_before else None,
                             ratio=best_before["rmse"] / best["rmse"] if best_before else None))
    return rows


def mnist_summary(cells: list[dict]) -> list[dict]:
    rows = []
    full = [c for c in cells if c["num_samples"] == 1000]
    for nfe in MNIST_NFES:
        here = [c for c in full if c["nfe_target"] == nfe]
        configs = sorted({(c["solver"], c["schedule"]) for c in here})
        stats = []
        for cfg in configs:
            vals = [c["mnist_fd"] for c in here if (c["solver"], c["schedule"]) == cfg and math.isfinite(c["mnist_fd"])]
            seed0 = [c["mnist_fd"] for c in here if (c["solver"], c["schedule"]) == cfg and c["seed"] == 0]
            if vals and seed0 and math.isfinite(seed0[0]):
                stats.append(dict(config=f"{cfg[0]} / {cfg[1]}", seed0=seed0[0], mean=statistics.mean(vals),
                                  lo=min(vals), hi=max(vals), sets=len(vals), before=is_before(*cfg)))
        if not stats:
            continue
        best = min(stats, key=lambda s: s["seed0"])
        before = [s for s in stats if s["before"]]
        best_before = min(before, key=lambda s: s["seed0"]) if before else None
        base = next((s for s in stats if s["config"] == "unipc_bh2 / leading"), None)
        three = [s for s in stats if s["sets"] == len(SEED_SETS)]
        best3 = min(three, key=lambda s: s["mean"]) if three else None
        rows.append(dict(nfe=nfe, best=best, baseline=base, best_before=best_before, best3=best3, configs=stats,
                         ratio=(base["seed0"] / best["seed0"]) if base else None,
                         ratio3=(base["mean"] / best3["mean"]) if base and best3 and base["sets"] == len(SEED_SETS)
                         else None,
                         ratio_before=(best_before["seed0"] / best["seed0"]) if best_before else None))
    return rows


def gmm_ratio_table(rows: list[dict]) -> list[str]:
    return ratio_table("| problem | NFE | best now | t_0 | RMSE | best before | t_0 | RMSE |", rows,
                       lambda r: f"{r['best']} | {r['best_t0']:.0f} | {fmt(r['best_rmse'])} | {r['before']} | "
                                 f"{r['before_t0']:.0f} | {fmt(r['before_rmse'])}", "cells")


def report(args, log) -> None:
    gmm_cells = read_jsonl(args.work / "gmm.jsonl")
    opt_cells = latest_opt_cells(args.work)
    mnist_cells = read_jsonl(args.work / "mnist.jsonl")
    commands = (args.work / "commands.txt").read_text().splitlines() if (args.work / "commands.txt").exists() else []
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commands=commands,
                machine=dict(cpu=platform.machine(), torch_threads=torch.get_num_threads()),
                versions=dict(python=platform.python_version(), torch=torch.__version__))
    solvers, skipped = deterministic_solvers()
    meta.update(gmm_solvers=solvers, gmm_solvers_left_out=skipped, gmm_schedules=list(GMM_SCHEDULES),
                gmm_option_schedules=list(GMM_OPTION_SCHEDULES), gmm_multistep=list(GMM_MULTISTEP),
                gmm_opt_solvers=list(GMM_OPT_SOLVERS), gmm_opt_method=GMM_OPT_METHOD,
                before_solvers=list(BEFORE_SOLVERS), before_schedules=list(BEFORE_SCHEDULES))
    gsum, gsum_opt, msum = gmm_summary(gmm_cells), gmm_summary(gmm_cells + opt_cells), mnist_summary(mnist_cells)
    gsum_tmax = gmm_summary(gmm_cells, True)
    gsum_opt_tmax = gmm_summary(gmm_cells + opt_cells, True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "breadth_gmm.json").write_text(json.dumps(dict(meta=meta, summary=gsum, summary_with_optimised=gsum_opt,
                                                               summary_from_t_max=gsum_tmax,
                                                               summary_with_optimised_from_t_max=gsum_opt_tmax,
                                                               cells=gmm_cells, optimised_cells=opt_cells,
                                                               optimised_cells_all_versions=read_jsonl(
                                                                   args.work / "gmm_opt.jsonl"))))
    (args.out / "breadth_mnist.json").write_text(json.dumps(dict(meta=meta, summary=msum, cells=mnist_cells),
                                                            indent=1))
    out = ["# Breadth benchmark (issue 17): every deterministic solver x peer step schedules", "",
           "Commands (in order):", "", "```bash", *commands, "```", "",
           f"{meta['date']}; {meta['machine']['cpu']}, torch threads {meta['machine']['torch_threads']}, shared "
           f"2-core CPU (every command under nice -n 5 since the screen extension); torch "
           f"{meta['versions']['torch']}. 'Before' = the solvers x schedules that existed before "
           f"issue 17 ({', '.join(BEFORE_SOLVERS)} x {', '.join(BEFORE_SCHEDULES)}, and karras / polyexponential "
           "with any option), rerun in the same phase.", ""]
    out += ["## GMM trajectory RMSE (SD discrete VP, exact denoiser; `benchmarks/gmm_solvers.py` problems)", "",
            f"Solvers: {', '.join(solvers)} (left out: {', '.join(skipped)}). Schedules: {', '.join(GMM_SCHEDULES)}; "
            f"also {', '.join(GMM_OPTION_SCHEDULES)} for {', '.join(GMM_MULTISTEP)}. A solver takes the most steps "
            "whose NFE fits the budget. RMSE against the exact PF-ODE solution from the run's own first point (scipy "
            "DOP853, tol 1e-10), 2048 evaluation noises (the seeds of `gmm_solvers.py`).", "",
            "### Reading 1: built-in schedules only", "", *gmm_ratio_table(gsum), "",
            "### Reading 2: including a per-model optimised schedule", "",
            f"Built-in solver + `diffsample.optimize_schedule(gmm.denoiser(ns), solver=..., steps=NFE, "
            f"method='{GMM_OPT_METHOD}', num_samples={GMM_OPT_CALIB})` (LD3-style Nelder-Mead on the endpoint error, "
            "started from the better of GITS and the best built-in; calibration noises from seed 10**12, disjoint "
            f"from the evaluation noises) for {', '.join(GMM_OPT_SOLVERS)}; on 64d also `optimised:ld3+pool,t0=t_max`: "
            "`num_samples=1024, pool=16384, free_start=False` (a stratified calibration set: the 512 of 16,384 "
            "noises that the built-in schedules get most wrong plus 512 drawn from the rest, weighted; the first "
            "time kept at t_max) for uni_pc, unipc_bh2 and uni_pc_bh2, and for uni_pc at NFE 15 and 20 also "
            "`num_samples=4096, pool=65536` (`fit=4096of65536`; the commands). 'Before' stays the "
            "pre-issue built-ins.",
            "", *gmm_ratio_table(gsum_opt), "",
            "### Both readings again, only runs that start at t_max = 999", "",
            "The RMSE is taken against the exact ODE solution from each run's own first point `t_0`: a grid that "
            "starts below `t_max` (leading, ddim_uniform, and optimised grids whose first time moved down) skips the "
            "start of the trajectory, and the noise it draws there is not the marginal at `t_0` for this mixture. "
            "Restricted to runs with `t_0 = t_max` (before and now alike):", "",
            "Built-in schedules only:", "", *gmm_ratio_table(gsum_tmax), "",
            "Including optimised schedules:", "", *gmm_ratio_table(gsum_opt_tmax), ""]
    big_cells = list({(*cell_key(c), c["samples"]): c for c in read_jsonl(args.work / "gmm_big.jsonl")}.values())
    newest_opt = {cell_key(o) for o in opt_cells}
    big_cells = [c for c in big_cells if not c["schedule"].startswith("optimised")  # optimised: the newest only
                 or cell_key(c) in newest_opt]
    sizes = sorted({c["samples"] for c in big_cells})
    if big_cells:
        bsums = {n: big_summary([c for c in big_cells if c["samples"] == n]) for n in sizes}
        gmm_json = json.loads((args.out / "breadth_gmm.json").read_text())
        gmm_json.update(summary_large_set=bsums[sizes[0]], large_set_cells=big_cells,
                        summary_large_sets={str(n): rows for n, rows in bsums.items()})
        (args.out / "breadth_gmm.json").write_text(json.dumps(gmm_json))
        out += ["### Reading 3: runs from t_max rescored on larger held-out sets", "",
                "On the 64-D mixture a few of the 2,048 evaluation noises decide the RMSE: a noise that the solver sends "
                "into another mixture component than the exact ODE adds about 0.016 on its own, and at NFE 15-20 there "
                "are 0-3 such noises per configuration. The configurations that start at t_max (the "
                "`--big-top` best pre-issue and best new built-in ones per NFE by the 2,048-noise RMSE, and every "
                f"optimised grid) were rerun on {' and '.join(f'{n:,}' for n in sizes)} other noises (seed "
                f"`NOISE_SEEDS + {BIG_SEED_OFFSET}`; a larger set starts with the noises of a smaller one) against "
                "the exact ODE from t_max; in parentheses the number of noises that end in another component than "
                "the exact solution ('flips').", ""]
        for n in sizes:
            out += [f"{n:,} noises:", "", *big_table(bsums[n]), ""]
    if opt_cells:
        versions_ = sorted({c["optimizer_version"] for c in opt_cells})
        out += [f"Optimised rows (RMSE on the evaluation noises; optimiser content hash {', '.join(versions_)}; "
                "CPU-s per schedule; plain rows exclude the shared teacher; pool rows include the probes and the "
                "teacher of the chosen noises, the first pool row of a process also the pool's endpoints):", "",
                "| problem | solver / schedule | " + " | ".join(f"NFE {n}" for n in GMM_NFES) + " |",
                "|---|---|" + "---|" * len(GMM_NFES)]
        for pn in PROBLEMS:
            pairs = sorted({(c["solver"], c["schedule"]) for c in opt_cells if c["problem"] == pn})
            for so, lab in pairs:
                vals = []
                for n in GMM_NFES:
                    c = next((c for c in opt_cells
                              if (c["problem"], c["solver"], c["schedule"], c["nfe_target"]) == (pn, so, lab, n)), None)
                    vals.append("" if c is None else f"{fmt(c['rmse'])} ({c.get('cpu_s') or 0:.0f} s)")
                out.append(f"| {pn} | {so} / {lab} | " + " | ".join(vals) + " |")
        out.append("")
    out += ["## MNIST-FD (bundled model, N = 1,000; seed sets 0 / 100000 / 200000 where run)", ""]
    if msum:
        out += ["| NFE | best (seed 0) | FD | best by 3-set mean | mean (min-max) | best pre-issue (seed 0) | FD | "
                "unipc_bh2 / leading (3-set mean) | leading / best (seed 0) | leading / best (3-set means) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in msum:
            b, base, b3, bb = r["best"], r["baseline"], r["best3"], r["best_before"]
            out.append(f"| {r['nfe']} | {b['config']} | {fmt(b['seed0'])} | {b3['config'] if b3 else '-'} | "
                       + (f"{fmt(b3['mean'])} ({fmt(b3['lo'])}-{fmt(b3['hi'])}) | " if b3 else "- | ")
                       + f"{bb['config'] if bb else '-'} | {fmt(bb['seed0']) if bb else '-'} | "
                       + (f"{fmt(base['seed0'])} ({fmt(base['mean'])}) | " if base else "- | ")
                       + f"{fmt(r['ratio'])} | {fmt(r['ratio3'])} |")
        out += ["", "All N = 1,000 configurations (seed set 0; mean over the seed sets run in parentheses):", "",
                "| configuration | " + " | ".join(f"NFE {n}" for n in MNIST_NFES) + " |",
                "|---|" + "---|" * len(MNIST_NFES)]
        configs = sorted({s["config"] for r in msum for s in r["configs"]})
        for cfg in configs:
            vals = []
            for r in msum:
                s = next((s for s in r["configs"] if s["config"] == cfg), None)
                vals.append("" if s is None else fmt(s["seed0"]) + (f" ({fmt(s['mean'])}, {s['sets']})"
                                                                     if s["sets"] > 1 else ""))
            out.append(f"| {cfg} | " + " | ".join(vals) + " |")
    screen = [c for c in mnist_cells if c["num_samples"] == args.screen_samples]
    if screen:
        out += ["", f"### Screen: MNIST-FD at NFE 5, N = {args.screen_samples}, seed 0 (rows: solver; columns: "
                "schedule; fail = error or non-finite)", ""]
        scheds = [s for s in MNIST_SCHEDULES_ALL + MNIST_SCHEDULES if any(c["schedule"] == s for c in screen)]
        scheds = list(dict.fromkeys(scheds))
        out += ["| solver | " + " | ".join(scheds) + " |", "|---|" + "---|" * len(scheds)]
        for solver in MNIST_SOLVERS:
            row = []
            for s in scheds:
                c = next((c for c in screen if c["solver"] == solver and c["schedule"] == s), None)
                row.append("" if c is None else fmt(c["mnist_fd"]))
            if any(row):
                out.append(f"| {solver} | " + " | ".join(row) + " |")
    out += ["", SIZING_NOTE]
    out += ["", "## GMM: every configuration", ""]
    for p in PROBLEMS:
        here = [c for c in gmm_cells if c["problem"] == p]
        if not here:
            continue
        out += [f"### {p}", "", "| solver / schedule | " + " | ".join(f"NFE {n}" for n in GMM_NFES) + " |",
                "|---|" + "---|" * len(GMM_NFES)]
        keys = sorted({(c["solver"], c["schedule"]) for c in here})
        for key in keys:
            vals = []
            for n in GMM_NFES:
                c = next((c for c in here if (c["solver"], c["schedule"]) == key and c["nfe_target"] == n), None)
                vals.append("" if c is None else fmt(c["rmse"]) + (f" ({c['nfe']})" if c.get("nfe") not in (None, n)
                                                                  else ""))
            out.append(f"| {key[0]} / {key[1]} | " + " | ".join(vals) + " |")
        out.append("")
    (args.out / "breadth.md").write_text("\n".join(out) + "\n")
    figure(args, gsum, gsum_opt, msum)
    log("\n".join(out[:80]))


def figure(args, gsum, gsum_opt, msum) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, p in zip(axes[:2], PROBLEMS):
        rows = [r for r in gsum if r["problem"] == p]
        if rows:
            ax.semilogy([r["nfe"] for r in rows], [r["best_rmse"] for r in rows], "o-", label="best now (built-in)")
            opt = [r for r in gsum_opt if r["problem"] == p]
            ax.semilogy([r["nfe"] for r in opt], [r["best_rmse"] for r in opt], "^:", label="best now incl. optimised")
            ax.semilogy([r["nfe"] for r in rows], [r["before_rmse"] for r in rows], "s--", label="best before issue 17")
        ax.set_title(f"GMM {p}: best trajectory RMSE")
        ax.set_xlabel("NFE")
        ax.legend()
    ax = axes[2]
    if msum:
        ax.semilogy([r["nfe"] for r in msum], [r["best"]["seed0"] for r in msum], "o-", label="best now (seed 0)")
        bb = [(r["nfe"], r["best_before"]["seed0"]) for r in msum if r["best_before"]]
        if bb:
            ax.semilogy(*zip(*bb), "d:", label="best pre-issue (seed 0)")
        base = [(r["nfe"], r["baseline"]["seed0"]) for r in msum if r["baseline"]]
        if base:
            ax.semilogy(*zip(*base), "s--", label="unipc_bh2 / leading")
    ax.set_title("MNIST-FD (N = 1,000)")
    ax.set_xlabel("NFE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "breadth.png", dpi=110)


# ---- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", default="all",
                    choices=["gmm", "gmm_opt", "gmm_big", "screen", "full", "seeds", "sweep", "report", "all"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/breadth_bench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--ref-cache", type=Path, default=Path("/tmp/breadth_bench/refs"))
    ap.add_argument("--gmm-samples", type=int, default=2048)
    ap.add_argument("--screen-samples", type=int, default=250)
    ap.add_argument("--top", type=int, default=3, help="screened configurations taken to N = 1,000")
    ap.add_argument("--seed-top", type=int, default=2, help="best N = 1,000 configurations given more seed sets")
    ap.add_argument("--seed-nfe", default="5,4,6,8,10", help="NFE values of the seeds phase, comma-separated")
    ap.add_argument("--full-nfe", default="5,4,6,8,10", help="NFE values of the full phase, comma-separated")
    ap.add_argument("--screen-solvers", default=",".join(MNIST_SOLVERS))
    ap.add_argument("--per-solver", type=int, default=2, help="sweep: best screened schedules per solver")
    ap.add_argument("--ref-nfe", type=int, default=5, help="sweep: the NFE every per-solver configuration runs at")
    ap.add_argument("--narrow-nfe", default="4,6", help="sweep: NFE values run for each solver's best at --ref-nfe")
    ap.add_argument("--best-only-nfe", default="8,10",
                    help="sweep: NFE values run for the narrow set's configurations within --within x the best")
    ap.add_argument("--within", type=float, default=1.5, help="sweep: see --best-only-nfe")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--opt-solvers", default="", help="gmm_opt: solvers (default GMM_OPT_SOLVERS)")
    ap.add_argument("--opt-nfe", default="", help="gmm_opt: NFE values (default GMM_NFES)")
    ap.add_argument("--opt-problems", default="", help="gmm_opt: problems (default both)")
    ap.add_argument("--opt-calib", type=int, default=GMM_OPT_CALIB, help="gmm_opt: calibration noises")
    ap.add_argument("--opt-pool", type=int, default=None,
                    help="gmm_opt: draw this many noises and calibrate on a stratified --opt-calib of them")
    ap.add_argument("--opt-fixed-start", action="store_true", help="gmm_opt: keep t_0 = t_max (free_start=False)")
    ap.add_argument("--opt-decoupled", action="store_true",
                    help="gmm_opt: LD3 also fits decoupled model times (decoupled=True); label +decoupled")
    ap.add_argument("--opt-max-evals", type=int, default=None, help="gmm_opt: LD3 objective evaluations (default 40 x NFE)")
    ap.add_argument("--big-problems", default="64d", help="gmm_big: problems, comma-separated")
    ap.add_argument("--big-samples", type=int, default=16384, help="gmm_big: held-out noises per problem")
    ap.add_argument("--big-top", type=int, default=5, help="gmm_big: best configurations per group and NFE rescored")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / "commands.txt", "a") as fh:
        fh.write("OMP_NUM_THREADS=1 python benchmarks/breadth_bench.py " + shlex.join(sys.argv[1:]) + "\n")
    logf = open(args.work / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    torch.set_num_threads(1)
    phases = ["gmm", "gmm_opt", "screen", "sweep", "report"] if args.phase == "all" else [args.phase]
    for phase in phases:
        log(f"== phase {phase} ({datetime.now(timezone.utc).isoformat(timespec='seconds')})")
        if phase == "gmm":
            phase_gmm(args, log)
        elif phase == "gmm_opt":
            phase_gmm_opt(args, log)
        elif phase == "gmm_big":
            phase_gmm_big(args, log)
        elif phase == "sweep":
            sweep(args, log)
        elif phase == "screen":
            solvers = [s for s in args.screen_solvers.split(",") if s]
            run_mnist([(s, sch, 5, 0, args.screen_samples) for s in solvers
                       for sch in (MNIST_SCHEDULES_ALL if s == solvers[0] else MNIST_SCHEDULES)], args, log)
        elif phase == "full":
            nfes = [int(v) for v in args.full_nfe.split(",") if v]
            run_mnist([(s, sch, n, 0, 1000) for n in nfes for s, sch in full_configs(args)], args, log)
        elif phase == "seeds":
            nfes = [int(v) for v in args.seed_nfe.split(",") if v]
            run_mnist([(s, sch, n, seed, 1000) for s, sch in seed_configs(args) for n in nfes
                       for seed in SEED_SETS[1:]], args, log)
        else:
            report(args, log)


if __name__ == "__main__":
    main()
