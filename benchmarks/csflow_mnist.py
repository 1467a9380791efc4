#!/usr/bin/env python
"""CSFlow step schedules (arXiv 2606.08833) against the built-in schedules: MNIST-FD vs NFE on the
bundled model, and the Gaussian-random-field check of the method's premise.

Phases (``--phase``):

* ``grid`` -- every solver x schedule x NFE at the first seed set: solvers dpmpp_2m, unipc_bh2,
  euler, heun; schedules trailing, leading, karras, lambda_uniform and csflow at mix 0.4 (default)
  and 1.0 at the paper's 76.55 pixels per degree, plus (solvers of ``--geometry-solvers``) both at
  16 pixels per degree -- a 16-pixel digit shown one degree wide; Heun also ``csflow:base=model``; NFE 4, 5, 6, 8, 10, 20 (Heun: 3, 4, 5, 10 steps = NFE 5, 7, 9, 19; its last
  step to sigma = 0 costs one evaluation). csflow runs with the bundled MNIST spectrum
  (``generate`` fills it in for the bundled model).
* ``seeds`` -- the further seed sets for csflow's default and, per solver, every built-in schedule
  that was best at some NFE in ``grid``.
* ``g3`` -- a stationary Gaussian random field on a 64 x 64 torus, ``P_d(f) = A (f + f0)^-2``, with the
  exact (Wiener-filter) denoiser on the rectified flow: every mode evolves alone, so one run with unit
  noise in every mode gives the generated spectrum exactly (``P_gen = gain^2``). Scored by the
  CSF-weighted relative spectral error ``sum_f CSF(f) |P_gen - P_d| / P_d / sum_f CSF(f)`` for csflow
  (the field's own spectrum) and the uniform grid at N = 4..10, Euler / Heun / DPM-Solver++(2M).
* ``plan`` -- the whole grid and seed sets as one queue in priority order (:func:`plan_tiers`), so
  that a run stopped early leaves the most useful cells; any number of workers can share one
  ``--work`` (each cell is claimed by a file naming the worker's pid). It also runs the flow-time
  Heun diagnostic (:class:`FlowHeun`, ``heun_flow``) on a few grids.
* ``report`` -- ``csflow_mnist.json`` (every cell, command, versions, date), ``csflow_mnist.md`` (tables,
  target check, every variant against the best built-in, Heun's first-step sigma ratios) and
  ``csflow_mnist.png`` (FD vs NFE per solver), plus ``csflow_g3.{json,md}``.

Cells are appended to ``--work/cells.jsonl`` (re-running resumes) and each phase's command to
``--work/commands.txt``, which the report lists. The committed results (N = 1,000) came from two
``plan`` workers on a shared 2-core CPU, stopped when the session's time ran out::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/csflow_mnist.py --phase plan --num-samples 1000 &  # x2
    python benchmarks/csflow_mnist.py --phase report --num-samples 1000 --out benchmarks/results

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

import numpy as np
import torch

SOLVERS = ("dpmpp_2m", "unipc_bh2", "euler", "heun")
BUILTIN = ("trailing", "leading", "karras", "lambda_uniform")
CSFLOW = ("csflow", "csflow:mix=1")
GEOMETRY = ("csflow:pixels_per_degree=16", "csflow:mix=1,pixels_per_degree=16")
DEFAULT = "csflow"
NFES = (4, 5, 6, 8, 10, 20)
GEOMETRY_SOLVERS = ("dpmpp_2m",)
EXTRA = {"heun": ("csflow:base=model",)}  # Heun (VE-sigma coordinates) with the timestep-uniform base
SEED_SETS = (0, 100_000, 200_000)


def steps_for(solver: str, args) -> list[int]:
    """Steps of ``solver``'s cells: the NFE values (``--short-nfe`` for ``--short-solvers``); Heun (NFE
    ``2 steps - 1``) gets ``(NFE + 1) // 2`` steps, duplicates dropped."""
    nfes = args.short_nfe if solver in args.short_solvers else args.nfe
    return heun_steps(nfes) if is_heun(solver) else list(nfes)


def read_cells(path: Path) -> dict[tuple, dict]:
    cells = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cells[(row["solver"], row["schedule"], row["steps"], row["seed"], row["num_samples"])] = row
    return cells


def run_cells(jobs, args, log=print) -> None:
    from diffsample.run.generate import generate
    from diffsample.run.models import load_model
    from diffsample.testbed.mnist import class_accuracy, mnist_fd

    path = args.work / "cells.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    done = read_cells(path)
    todo = [j for j in jobs if (*j, args.num_samples) not in done]
    log(f"{len(todo)} cells to run ({len(jobs) - len(todo)} done)")
    if not todo:
        return
    model = load_model("mnist")
    with open(path, "a") as fh:
        for solver, schedule, steps, seed in todo:
            t0 = time.perf_counter()
            res = generate(model, solver=solver, schedule=schedule, steps=steps, seed=seed,
                           num_samples=args.num_samples, batch_size=args.batch_size)
            x = res.samples.clamp(-1, 1)
            row = {"solver": solver, "schedule": schedule, "steps": steps, "seed": seed,
                   "num_samples": args.num_samples, "schedule_ran": res.record["schedule"], "nfe": res.record["nfe"],
                   "mnist_fd": mnist_fd(x), "class_accuracy": class_accuracy(x, torch.as_tensor(res.record["classes"])),
                   "wall_s": round(time.perf_counter() - t0, 2)}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            log(f"{solver:>10s} {schedule:>38s} steps={steps:<3d} seed={seed:<6d} nfe={row['nfe']:<3d} "
                f"FD={row['mnist_fd']:.3f} ({row['wall_s']:.0f} s)")


def schedules_for(solver: str, args) -> tuple[str, ...]:
    return (*BUILTIN, *CSFLOW, *(GEOMETRY if solver in args.geometry_solvers else ()), *EXTRA.get(solver, ()))


def grid_jobs(args):
    return [(s, sch, n, args.seed_sets[0]) for s in args.solvers for sch in schedules_for(s, args)
            for n in steps_for(s, args)]


def seed_steps(solver: str, args) -> list[int]:
    """Steps of ``solver``'s seeds-phase cells: those of ``--seed-nfe`` (all when not given)."""
    steps = steps_for(solver, args)
    if args.seed_nfe is None:
        return steps
    return [n for n in steps if (2 * n - 1 if is_heun(solver) else n) in args.seed_nfe]


def best_builtins(cells, args) -> dict[str, set[str]]:
    """Per solver: the built-in schedules that have the lowest FD at some seeds-phase NFE on the first seed set."""
    out = {}
    for s in args.solvers:
        winners = set()
        for n in seed_steps(s, args):
            vals = [(cells[k]["mnist_fd"], sch) for sch in BUILTIN
                    if (k := (s, sch, n, args.seed_sets[0], args.num_samples)) in cells]
            if vals:
                winners.add(min(vals)[1])
        out[s] = winners
    return out


def seed_jobs(args):
    cells = read_cells(args.work / "cells.jsonl")
    best = best_builtins(cells, args)
    return [(s, sch, n, seed) for s in args.seed_solvers for sch in (DEFAULT, *sorted(best[s]))
            for n in seed_steps(s, args) for seed in args.seed_sets[1:]]


PLAN_NEAR = (5, 6, 8, 10)
"""NFE of the plan's first tiers (the target's range without NFE 20)."""


def is_heun(solver: str) -> bool:
    return solver in ("heun", FLOW_HEUN)


def heun_steps(nfes) -> list[int]:
    return sorted({(n + 1) // 2 for n in nfes})


PRESELECT_N = 250
"""The smaller run whose first-seed-set FD preselects the built-ins the plan reruns at N = 1,000."""


def plan_tiers(cells, args) -> list[list[tuple]]:
    """The plan in priority order, given the cells done so far, so that a run stopped early leaves the
    most useful cells. "Top built-ins" of a solver and NFE: the two built-in schedules with the lowest
    FD at N = 250 on the first seed set (:data:`PRESELECT_N` cells in ``--work``; at the nearest NFE
    measured there; all four when none), the others being far behind there; "best": the lowest at
    this N on the first seed set.

    1. csflow's default and the top built-ins, first seed set, non-Heun solvers, NFE 5, 6, 8, 10;
    2. Heun at 3 and 5 steps (NFE 5, 9): csflow and the top built-in, and the flow-time Heun
       diagnostic (:class:`FlowHeun`) on csflow;
    3. csflow's default and the top built-in at NFE 20 (non-Heun);
    4. csflow's default and the best built-in on the further seed sets, dpmpp_2m and unipc_bh2 at
       NFE 8, then the non-Heun solvers at NFE 10, 5, 6, 20;
    5. csflow variants (``mix=1``, 16 pixels per degree) for dpmpp_2m / unipc_bh2 at NFE 5, 8, 20;
    6. everything else of the full grid.
    """
    s0, rest = args.seed_sets[0], args.seed_sets[1:]
    plain = [s for s in args.solvers if not is_heun(s)]
    heun = [s for s in args.solvers if s == "heun"]
    variants = ("csflow:mix=1", "csflow:pixels_per_degree=16")
    key = lambda j, n_samples=args.num_samples: (*j, n_samples)  # noqa: E731

    def top(s, n):
        pre = {(k[1], k[2]): c["mnist_fd"] for k, c in cells.items()
               if k[0] == s and k[3] == s0 and k[4] == PRESELECT_N and k[1] in BUILTIN}
        measured = sorted({m for _, m in pre})
        if not measured:
            return list(BUILTIN)
        m = min(measured, key=lambda v: (abs(v - n), v))
        return [b for _, b in sorted((fd, b) for (b, mm), fd in pre.items() if mm == m)[:2]]

    def best(s, n):
        vals = [(cells[key((s, b, n, s0))]["mnist_fd"], b) for b in BUILTIN if key((s, b, n, s0)) in cells]
        return [min(vals)[1]] if vals else []

    tiers = [
        [(s, sch, n, s0) for n in PLAN_NEAR for s in plain for sch in (DEFAULT, *top(s, n))],
        [(s, sch, n, s0) for s in heun for n in (3, 5) for sch in (DEFAULT, *top(s, n)[:1])]
        + [(FLOW_HEUN, DEFAULT, n, s0) for n in (3, 5)],
        [(s, sch, 20, s0) for s in plain for sch in (DEFAULT, *top(s, 20)[:1])],
        [(s, sch, 8, seed) for s in plain[:2] for seed in rest for sch in (DEFAULT, *best(s, 8))]
        + [(s, sch, n, seed) for n in (10, 5, 6, 20) for s in plain for seed in rest
           for sch in (DEFAULT, *best(s, n))],
        [(s, sch, n, s0) for n in (5, 8, 20) for s in plain[:2] for sch in variants],
        grid_jobs(args) + [(s, sch, n, seed) for seed in rest for s in args.solvers
                           for n in steps_for(s, args) for sch in (*BUILTIN, DEFAULT)],
    ]
    return tiers


def claim(args, job) -> bool:
    """Claim ``job`` for this process (a file naming our pid; a dead owner's claim is taken over)."""
    import os

    d = args.work / "claims"
    d.mkdir(parents=True, exist_ok=True)
    path = d / ("|".join(map(str, (*job, args.num_samples))).replace("/", "_"))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                owner = int(path.read_text() or 0)
                os.kill(owner, 0)
                return False  # alive (or the same pid): someone else's
            except (ValueError, ProcessLookupError):
                path.unlink(missing_ok=True)
    return False


def run_plan(args) -> None:
    """Run :func:`plan_tiers` as a queue shared by any number of workers on one ``--work``."""
    if any(FLOW_HEUN == s for tier in plan_tiers({}, args) for s, *_ in tier):
        register_flow_heun()
    while True:
        cells = read_cells(args.work / "cells.jsonl")
        todo = [j for tier in plan_tiers(cells, args) for j in tier if (*j, args.num_samples) not in cells]
        nxt = next((j for j in dict.fromkeys(todo) if claim(args, j)), None)
        if nxt is None:
            print("plan: nothing left to claim")
            return
        run_cells([nxt], args)


# ---- diagnostic: Heun's trapezoid in flow time ---------------------------------------------------------

FLOW_HEUN = "heun_flow"


class FlowHeun:
    """Diagnostic, not a registered solver: Heun's trapezoid rule in the flow time
    ``u = alpha / (alpha + sigma)`` on the state ``z = x / (alpha + sigma)`` (velocity
    ``dz/du = (D - z) / (1 - u)``), the coordinates of the paper's Heun sampler (arXiv 2606.08833),
    against diffsample's ``heun`` (EDM's trapezoid in the VE sigma). Same stages and NFE; the step to
    ``sigma = 0`` is an Euler step (it returns the denoised estimate)."""

    order = 2
    stochastic = False

    def init(self, x, grid):
        return None

    def nfe(self, grid) -> int:
        return 2 * grid.steps - (1 if grid.final_zero else 0)

    def step(self, denoise, x, grid, i, state, noise_fn=None):
        from diffsample.solvers.solver import call_denoise

        a0, a1 = grid.alpha_list[i], grid.alpha_list[i + 1]
        s0, s1 = grid.sigma_list[i], grid.sigma_list[i + 1]
        u0, u1 = a0 / (a0 + s0), a1 / (a1 + s1)
        z = x / (a0 + s0)
        v0 = (call_denoise(denoise, x, grid.t_list[i]) - z) / (1 - u0)
        z_pred = z + (u1 - u0) * v0
        if s1 == 0:
            return a1 * z_pred, None
        v1 = (call_denoise(denoise, (a1 + s1) * z_pred, grid.t_list[i + 1]) - z_pred) / (1 - u1)
        return (a1 + s1) * (z + (u1 - u0) * 0.5 * (v0 + v1)), None


def register_flow_heun() -> None:
    from diffsample.solvers import SOLVERS

    if FLOW_HEUN not in SOLVERS:
        SOLVERS.add(FLOW_HEUN, FlowHeun, "diagnostic: Heun's trapezoid in flow time (benchmarks/csflow_mnist.py)")


# ---- G3: Gaussian random field -------------------------------------------------------------------------

def g3(size: int = 64, amplitude: float = 1e-3, f0: float = 0.01, ns_list=range(4, 11),
       solvers=("euler", "heun", "dpmpp_2m")) -> list[dict]:
    """CSF-weighted spectral error of csflow vs the uniform grid on an exact Gaussian field (module docstring)."""
    import tempfile

    from diffsample.samplers import Sampler
    from diffsample.solvers import SOLVERS, STEP_SCHEDULES, RectifiedFlow
    from diffsample.solvers.csflow import barten_csf, pixels_per_degree
    from diffsample.solvers.spectrum import Spectrum, radial_bins, save_spectrum

    index, centres = radial_bins(size, size)
    fy, fx = np.fft.fftfreq(size), np.fft.fftfreq(size)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    power = amplitude * (radius + f0) ** -2.0  # per-mode P_d; E|FFT|^2 / (H W) of the field
    counts = np.bincount(index.ravel(), minlength=centres.size)
    ring = lambda a: np.bincount(index.ravel(), weights=a.ravel(), minlength=centres.size) / counts  # noqa: E731
    p_ring = ring(power)
    tmp = Path(tempfile.mkdtemp()) / "field.json"
    save_spectrum(Spectrum(centres, p_ring, np.ones_like(p_ring), name="field"), tmp)
    csf = barten_csf(centres * pixels_per_degree())
    flat = torch.as_tensor(power.ravel())

    ns = RectifiedFlow(t_min=1e-3, t_max=1.0)

    class Wiener:
        noise_schedule = ns

        def __call__(self, x, t, cond=None):
            a, s = ns.alpha(t[:1]).item(), ns.sigma(t[:1]).item()
            return x * (a * flat / (a * a * flat + s * s))

    rows = []
    for solver in solvers:
        for sched_name, spec in (("uniform", f"csflow:mix=0,spectrum={tmp}"), ("csflow", f"csflow:spectrum={tmp}"),
                                 ("csflow:mix=1", f"csflow:mix=1,spectrum={tmp}")):
            for n in ns_list:
                steps = n
                out = Sampler(SOLVERS.create(solver), STEP_SCHEDULES.create(spec), steps)(
                    Wiener(), torch.ones(1, size * size, dtype=torch.float64))
                gain2 = out.x[0].numpy().reshape(size, size) ** 2  # unit noise in every mode
                rel = np.abs(ring(gain2) - p_ring) / p_ring
                rows.append({"solver": solver, "schedule": sched_name, "steps": steps, "nfe": out.nfe,
                             "csf_error": float((csf * rel).sum() / csf.sum()),
                             "low_freq_error": float(rel[: centres.size // 4].mean()),
                             "high_freq_error": float(rel[centres.size // 2:].mean())})
    return rows


# ---- report --------------------------------------------------------------------------------------------

def summarise(cells, args):
    """(solver, schedule, steps) -> {"nfe", "mean", "values"} over the seed sets present."""
    groups: dict[tuple, dict] = {}
    for (s, sch, n, seed, N), row in cells.items():
        if N != args.num_samples:
            continue
        g = groups.setdefault((s, sch, n), {"nfe": row["nfe"], "values": {}})
        g["values"][seed] = row["mnist_fd"]
    for g in groups.values():
        g["mean"] = statistics.fmean(g["values"].values())
    return groups


def target_check(groups, args, schedule: str = DEFAULT) -> list[dict]:
    """Per solver and NFE: ``schedule`` (csflow's default) vs the best built-in (picked on the first
    seed set, compared on the seed sets both have)."""
    rows = []
    s0 = args.seed_sets[0]
    for s in args.solvers:
        for n in steps_for(s, args):
            cs = groups.get((s, schedule, n))
            cands = [(groups[(s, b, n)]["values"][s0], b) for b in BUILTIN
                     if (s, b, n) in groups and s0 in groups[(s, b, n)]["values"]]
            if cs is None or not cands:
                continue
            best = min(cands)[1]
            bg = groups[(s, best, n)]
            seeds = sorted(set(cs["values"]) & set(bg["values"]))
            c = statistics.fmean(cs["values"][k] for k in seeds)
            b = statistics.fmean(bg["values"][k] for k in seeds)
            rows.append({"solver": s, "steps": n, "nfe": cs["nfe"], "best_builtin": best, "seed_sets": len(seeds),
                         "csflow_fd": c, "best_builtin_fd": b, "ratio": c / b})
    return rows


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive")


def commands(args) -> list[str]:
    """The commands that ran this ``--num-samples``'s cells and G3 (``--work/commands.txt``), one per
    line, each once. Cells are keyed by (solver, schedule, steps, seed, N) and do not depend on the
    order or the process that ran them."""
    path = args.work / "commands.txt"
    if not path.exists():
        return []
    keep = [c for c in path.read_text().splitlines(keepends=True)
            if f"--num-samples {args.num_samples} " in c.rstrip() + " " or c.rstrip().endswith("--phase g3")]
    return list(dict.fromkeys(keep))


def fmt(g) -> str:
    vals = list(g["values"].values())
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{g['mean']:.2f} ({min(vals):.2f}-{max(vals):.2f}; {len(vals)})"


def first_step_ratios(schedules, steps) -> dict[str, list[float]]:
    """``s0 / s1`` of each schedule's first step on the bundled MNIST model (VE sigma ``s = sigma / alpha``)."""
    from diffsample.run.models import load_model
    from diffsample.solvers import STEP_SCHEDULES

    ns = load_model("mnist").denoiser.noise_schedule
    out = {}
    for sch in schedules:
        spec = sch if not sch.startswith("csflow") else sch.replace("csflow", "csflow:spectrum=mnist", 1).replace(
            "mnist:", "mnist,", 1)
        row = []
        for n in steps:
            t = STEP_SCHEDULES.create(spec)(ns, n)
            sv = (ns.sigma(t) / ns.alpha(t)).tolist() + [0.0]
            row.append(sv[0] / sv[1] if sv[1] > 0 else math.inf)
        out[sch] = row
    return out


def report(args, meta) -> None:
    cells = read_cells(args.work / "cells.jsonl")
    groups = summarise(cells, args)
    checks = target_check(groups, args)
    schedules = (*BUILTIN, *CSFLOW, *GEOMETRY, *sorted({e for v in EXTRA.values() for e in v}))
    shown = [*args.solvers, *([FLOW_HEUN] if any(k[0] == FLOW_HEUN for k in groups) else [])]
    per_cell = {}
    for (s, sch, n), g in groups.items():
        per_cell.setdefault(len(g["values"]), []).append(1)
    coverage = ", ".join(f"{len(v)} with {k} seed set{'s' if k > 1 else ''}" for k, v in sorted(per_cell.items()))
    lines = ["# CSFlow vs built-in step schedules on the bundled MNIST model\n",
             "```bash\n" + "".join(commands(args)) + f"{meta['command']}\n```\n",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}. MNIST-FD of N = {args.num_samples} samples "
             f"(classes balanced) against the 1,000 held-out digits; seed sets start at {list(args.seed_sets)}: "
             "a cell is `mean (min-max; seed sets)` over the seed sets run, or one value (first seed set only). "
             f"Cells: {coverage} (the `plan` phase runs them in priority order; see the module docstring). "
             "csflow uses the bundled MNIST spectrum; `pixels_per_degree=16`: the digit shown 1 degree wide "
             "(default 76.55: 0.2 degree). `heun_flow` is a diagnostic (Heun's trapezoid in flow time, the "
             "paper's coordinates; `FlowHeun` in the script), not a diffsample solver.\n"]
    for s in shown:
        nsteps = steps_for(s, args)
        nfe_of = {n: next((groups[(s, sch, n)]["nfe"] for sch in schedules if (s, sch, n) in groups), 2 * n - 1
                          if is_heun(s) else n) for n in nsteps}
        lines.append(f"\n## {s}\n\n| schedule | " + " | ".join(f"NFE {nfe_of[n]}" for n in nsteps) + " |")
        lines.append("|---|" + "---|" * len(nsteps))
        for sch in schedules:
            if not any((s, sch, n) in groups for n in nsteps):
                continue
            cells_txt = [fmt(groups[(s, sch, n)]) if (s, sch, n) in groups else "" for n in nsteps]
            lines.append(f"| {sch} | " + " | ".join(cells_txt) + " |")
    lines.append("\n## Target: csflow (default) vs the best built-in schedule\n")
    lines.append("Best built-in picked on the first seed set; both compared on the seed sets both have.\n")
    lines.append("| solver | NFE | best built-in | seed sets | csflow FD | best built-in FD | ratio |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in checks:
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['best_builtin']} | {r['seed_sets']} | {r['csflow_fd']:.3f} | "
                     f"{r['best_builtin_fd']:.3f} | {r['ratio']:.2f} |")
    in_range = [r for r in checks if 5 <= r["nfe"] <= 20]
    within = all(r["ratio"] <= 1.05 for r in in_range)
    beats = {r["solver"] for r in in_range if r["nfe"] <= 8 and r["ratio"] < 1.0}
    beats_all = [s for s in args.solvers if any(r["solver"] == s and r["nfe"] <= 8 for r in in_range)
                 and all(r["ratio"] < 1.0 for r in in_range if r["solver"] == s and r["nfe"] <= 8)]
    worst = max((r["ratio"] for r in in_range), default=math.nan)
    lines.append(f"\nWithin 1.05x of the best built-in at every NFE 5-20 measured, every solver: **{'yes' if within else 'no'}** "
                 f"(worst ratio {worst:.2f}). Beats it at every NFE 5-8 measured for: "
                 f"{', '.join(beats_all) or 'none'} (target: two solvers); at some NFE 5-8 for: {', '.join(sorted(beats)) or 'none'}.\n")
    variants = [v for v in (DEFAULT, *CSFLOW[1:], *GEOMETRY, *sorted({e for v in EXTRA.values() for e in v}))
                if any(k[1] == v for k in groups)]
    lines.append("\n## Every csflow variant: FD / best built-in's FD\n")
    lines.append("Same comparison for each variant measured (seed sets both have); < 1: the variant is better.\n")
    for s in args.solvers:
        nsteps = steps_for(s, args)
        rows_v = {v: {r["steps"]: r["ratio"] for r in target_check(groups, args, v) if r["solver"] == s} for v in variants}
        rows_v = {v: r for v, r in rows_v.items() if r}
        if not rows_v:
            continue
        lines.append(f"\n| {s} | " + " | ".join(f"NFE {2 * n - 1 if is_heun(s) else n}" for n in nsteps) + " |")
        lines.append("|---|" + "---|" * len(nsteps))
        for v, r in rows_v.items():
            lines.append(f"| {v} | " + " | ".join(f"{r[n]:.2f}" if n in r else "" for n in nsteps) + " |")
    if "heun" in args.solvers:
        hsteps = steps_for("heun", args)
        ratios = first_step_ratios((*BUILTIN, *CSFLOW, *sorted({e for v in EXTRA.values() for e in v})), hsteps)
        lines.append("\n## Heun: the first step's sigma ratio\n")
        lines.append("`r = s0 / s1` of the first step (VE sigma, from s0 = 157.4 on this model). `heun` (EDM's "
                     "trapezoid in the VE sigma) returns `D0 + (r - 1) / 2 (D1 - D0) + (s1 / s0) (y0 - D0)` on that "
                     "step (`D0`, `D1`: the denoised estimates at its two stages): for r > 3 it extrapolates the "
                     "denoised estimates, where they change most (tests/solvers/test_csflow.py).\n")
        lines.append("| schedule | " + " | ".join(f"{n} steps (NFE {2 * n - 1})" for n in hsteps) + " |")
        lines.append("|---|" + "---|" * len(hsteps))
        for sch, row in ratios.items():
            lines.append(f"| {sch} | " + " | ".join(f"{r:.1f}" for r in row) + " |")
    (args.out / "csflow_mnist.md").write_text("\n".join(lines) + "\n")
    (args.out / "csflow_mnist.json").write_text(json.dumps({**meta, "commands": [c.strip() for c in commands(args)],
                                                            "num_samples": args.num_samples,
                                                            "seed_sets": list(args.seed_sets),
                                                            "cells": [c for c in cells.values() if c["num_samples"] == args.num_samples],
                                                            "target": checks}, indent=1) + "\n")
    plot(groups, args, shown)
    g3_path = args.work / "g3.json"
    if g3_path.exists():
        rows = json.loads(g3_path.read_text())
        md = ["# CSFlow on an exact Gaussian random field (64 x 64 torus)\n",
              "```bash\n" + "".join(c for c in commands(args) if "g3" in c) + "```\n",
              "CSF-weighted relative spectral error of the generated field (exact: one run with unit noise in every "
              "mode), rectified flow, exact Wiener-filter denoiser, P_d(f) = 1e-3 (f + 0.01)^-2, 76.55 pixels per "
              "degree. Lower is better.\n",
              "| solver | schedule | " + " | ".join(f"N={n}" for n in sorted({r['steps'] for r in rows})) + " |",
              "|---|---|" + "---|" * len({r['steps'] for r in rows})]
        for s in dict.fromkeys(r["solver"] for r in rows):
            for sch in dict.fromkeys(r["schedule"] for r in rows):
                vals = [r for r in rows if r["solver"] == s and r["schedule"] == sch]
                md.append(f"| {s} | {sch} | " + " | ".join(f"{r['csf_error']:.4f}" for r in sorted(vals, key=lambda r: r['steps'])) + " |")
        (args.out / "csflow_g3.md").write_text("\n".join(md) + "\n")
        (args.out / "csflow_g3.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


def plot(groups, args, shown) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 4.2), squeeze=False)
    for ax, s in zip(axes[0], shown):
        for sch in (*BUILTIN, *CSFLOW, *GEOMETRY, *EXTRA.get(s, ())):
            pts = sorted((g["nfe"], g["mean"], min(g["values"].values()), max(g["values"].values()))
                         for (ss, c, n), g in groups.items() if ss == s and c == sch)
            if not pts:
                continue
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            style = "-" if sch.startswith("csflow") else "--"
            ax.errorbar(x, y, yerr=err, fmt=style, marker="o", ms=3, capsize=2, label=sch,
                        lw=2.2 if sch == DEFAULT else 1.2, color=COLORS[(*BUILTIN, *CSFLOW, *GEOMETRY,
                                                                          "csflow:base=model").index(sch)])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({g["nfe"] for (ss, _, _), g in groups.items() if ss == s})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_title(s + (" (diagnostic)" if s == FLOW_HEUN else ""))
        ax.set_xlabel("NFE")
        ax.set_ylabel(f"MNIST-FD (N={args.num_samples})")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out / "csflow_mnist.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=("grid", "seeds", "plan", "g3", "report", "all"), default="all")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--short-solvers", default="", help="solvers run at --short-nfe only")
    p.add_argument("--short-nfe", default="5,8,20")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--seed-sets", default=",".join(map(str, SEED_SETS)))
    p.add_argument("--geometry-solvers", default=",".join(GEOMETRY_SOLVERS),
                   help="solvers that also run the csflow variants at 16 pixels per degree")
    p.add_argument("--seed-solvers", default=None, help="solvers of the seeds phase (default: all)")
    p.add_argument("--seed-nfe", default=None, help="NFE values of the seeds phase (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/csflow_mnist"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.nfe = [int(v) for v in args.nfe.split(",")]
    args.short_nfe = [int(v) for v in args.short_nfe.split(",")]
    args.short_solvers = args.short_solvers.split(",") if args.short_solvers else []
    args.solvers = args.solvers.split(",")
    args.seed_sets = [int(v) for v in args.seed_sets.split(",")]
    args.geometry_solvers = args.geometry_solvers.split(",") if args.geometry_solvers else []
    args.seed_solvers = args.seed_solvers.split(",") if args.seed_solvers else args.solvers
    args.seed_nfe = [int(v) for v in args.seed_nfe.split(",")] if args.seed_nfe else None
    torch.set_num_threads(args.threads)
    meta = {"command": "python " + shlex.join(["benchmarks/csflow_mnist.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {args.threads} thread(s), shared 2-core CPU", "torch": torch.__version__}
    if args.phase != "report":  # the report lists every command that made its cells
        args.work.mkdir(parents=True, exist_ok=True)
        with open(args.work / "commands.txt", "a") as fh:
            fh.write(meta["command"] + "\n")
    if args.phase in ("grid", "all"):
        run_cells(grid_jobs(args), args)
    if args.phase in ("seeds", "all"):
        run_cells(seed_jobs(args), args)
    if args.phase == "plan":
        run_plan(args)
    if args.phase in ("g3", "all"):
        rows = g3()
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "g3.json").write_text(json.dumps(rows))
    if args.phase in ("report", "all"):
        args.out.mkdir(parents=True, exist_ok=True)
        report(args, meta)
        print((args.out / "csflow_mnist.md").read_text())


if __name__ == "__main__":
    main()
