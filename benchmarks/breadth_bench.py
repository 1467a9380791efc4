#!/usr/bin/env python
"""Issue 17 (breadth): every registered deterministic solver x the step schedules that make sense
for it, on the exact Gaussian mixtures (trajectory RMSE, NFE 5-20) and on the bundled MNIST model
(MNIST-FD, NFE 4-10), against today's best configurations measured in the same run.

Phases (``--phase``; cells go to ``--work/*.jsonl``, a rerun resumes; every command is appended to
``--work/commands.txt`` and listed in the report):

* ``gmm`` -- the two problems of ``benchmarks/gmm_solvers.py`` (SD's discrete VP process, the same
  seeded noises, its reference ODE solutions): every deterministic SOLVERS entry (SteinDiff presets
  left out: they are experimental and spend model evaluations beyond their NFE) x ``GMM_SCHEDULES``
  x NFE. A solver runs the most steps whose ``nfe`` fits the budget (Heun: ``2 steps - 1``).
* ``screen`` -- MNIST-FD at NFE 5, N = ``--screen-samples`` (250), seed 0, for ``MNIST_SOLVERS`` x
  ``MNIST_SCHEDULES``: to pick the configurations worth N = 1,000.
* ``full`` -- MNIST-FD at N = 1,000, seed 0, NFE 4, 5, 6, 8, 10, for the ``--top`` best screened
  configurations plus the baselines (``unipc_bh2 / leading``: today's best, 3.29 at NFE 5;
  ``unipc_bh2 / csflow``).
* ``seeds`` -- the seed sets 100000 and 200000 (N = 1,000) at ``--seed-nfe`` for the best
  ``--seed-top`` configurations of ``full`` at NFE 5 and the baselines.
* ``report`` -- ``breadth_{gmm,mnist}.json``, ``breadth.md`` (best configuration per NFE, ratios to
  today's best, full tables) and ``breadth.png`` into ``--out``.

"Today's best" is the best configuration over the solvers and schedules that existed before issue 17
(``BEFORE_SOLVERS`` x ``BEFORE_SCHEDULES``), rerun in the same phase. Usage::

    OMP_NUM_THREADS=1 python benchmarks/breadth_bench.py --phase all --out benchmarks/results

The committed results ran the phases one by one on a shared 2-core CPU (MNIST: NFE 5 first, then
the seed sets, then NFE 4, 6, 8, 10); ``benchmarks/results/breadth.md`` lists the exact commands.

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
from gmm_solvers import NOISE_SEEDS, PROBLEMS, SD_BETAS, References, rmse  # noqa: E402

from diffsample.samplers import Sampler  # noqa: E402
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, DiscreteVP  # noqa: E402
from diffsample.testbed.gmm import GaussianMixture  # noqa: E402

# uni_pc / uni_pc_bh2 (new names) are the pre-issue specs unipc_bh1/bh2:predictor_order=3.
BEFORE_SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc_bh1", "unipc_bh2", "uni_pc", "uni_pc_bh2",
                  "dpmpp_3m:third_order=reference")
BEFORE_SCHEDULES = ("karras", "exponential", "linspace", "leading", "trailing", "polyexponential:rho=2", "csflow")
GMM_SCHEDULES = ("karras", "exponential", "linspace", "leading", "trailing", "polyexponential:rho=2", "simple",
                 "normal", "sgm_uniform", "ddim_uniform", "beta", "kl_optimal", "laplace", "vp", "align_your_steps",
                 "align_your_steps:model=sdxl", "gits", "gits:coeff=1.1", "gits:coeff=1.3")
GMM_NFES = (5, 6, 8, 10, 15, 20)
# Sized for a shared 2-core CPU: the multistep solvers of order >= 3 (ipndm first, screened on every schedule).
MNIST_SOLVERS = ("ipndm", "unipc_bh2", "uni_pc_bh2", "dpmpp_3m", "deis")
# The screen's schedules: ipndm's first row measured all 13 of these; the seven that failed badly at NFE 5
# on this model (trailing, karras, beta, laplace, vp, kl_optimal: FD 66-316, all start at sigma ~157) are
# left out for the other solvers, keeping sgm_uniform as the one uniform-to-the-top representative.
MNIST_SCHEDULES_ALL = ("leading", "trailing", "karras", "align_your_steps", "gits", "gits:coeff=1.1", "kl_optimal",
                       "beta", "sgm_uniform", "ddim_uniform", "laplace", "vp", "csflow")
MNIST_SCHEDULES = ("leading", "align_your_steps", "gits", "gits:coeff=1.1", "ddim_uniform", "csflow")
MNIST_NFES = (4, 5, 6, 8, 10)
BASELINES = (("unipc_bh2", "leading"), ("unipc_bh2", "csflow"))
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
    return specs + [s for s in BEFORE_SOLVERS if s not in specs], skipped


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
    return solver in BEFORE_SOLVERS and schedule in BEFORE_SCHEDULES


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
            for nfe in GMM_NFES:
                for solver in solvers:
                    for schedule in GMM_SCHEDULES:
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


# ---- report ------------------------------------------------------------------------------------
def fmt(v) -> str:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "fail"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.2e}"


def gmm_summary(cells: list[dict]) -> list[dict]:
    rows = []
    for p in PROBLEMS:
        for nfe in GMM_NFES:
            here = [c for c in cells if c["problem"] == p and c["nfe_target"] == nfe and math.isfinite(c["rmse"])]
            if not here:
                continue
            best = min(here, key=lambda c: c["rmse"])
            before = [c for c in here if c["before"]]
            best_before = min(before, key=lambda c: c["rmse"]) if before else None
            rows.append(dict(problem=p, nfe=nfe, best=f"{best['solver']} / {best['schedule']}", best_rmse=best["rmse"],
                             best_nfe=best["nfe"],
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
        base = next((s for s in stats if s["config"] == "unipc_bh2 / leading"), None)
        rows.append(dict(nfe=nfe, best=best, baseline=base, configs=stats,
                         ratio=(base["seed0"] / best["seed0"]) if base else None))
    return rows


def report(args, log) -> None:
    gmm_cells = read_jsonl(args.work / "gmm.jsonl")
    mnist_cells = read_jsonl(args.work / "mnist.jsonl")
    commands = (args.work / "commands.txt").read_text().splitlines() if (args.work / "commands.txt").exists() else []
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commands=commands,
                machine=dict(cpu=platform.machine(), torch_threads=torch.get_num_threads()),
                versions=dict(python=platform.python_version(), torch=torch.__version__))
    solvers, skipped = deterministic_solvers()
    meta.update(gmm_solvers=solvers, gmm_solvers_left_out=skipped, gmm_schedules=list(GMM_SCHEDULES),
                before_solvers=list(BEFORE_SOLVERS), before_schedules=list(BEFORE_SCHEDULES))
    gsum, msum = gmm_summary(gmm_cells), mnist_summary(mnist_cells)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "breadth_gmm.json").write_text(json.dumps(dict(meta=meta, summary=gsum, cells=gmm_cells)))
    (args.out / "breadth_mnist.json").write_text(json.dumps(dict(meta=meta, summary=msum, cells=mnist_cells),
                                                            indent=1))
    out = ["# Breadth benchmark (issue 17): every deterministic solver x peer step schedules", "",
           "Commands (in order):", "", "```bash", *commands, "```", "",
           f"{meta['date']}; {meta['machine']['cpu']}, torch threads {meta['machine']['torch_threads']}, shared "
           f"2-core CPU; torch {meta['versions']['torch']}. 'Before' = the solvers x schedules that existed before "
           f"issue 17 ({', '.join(BEFORE_SOLVERS)} x {', '.join(BEFORE_SCHEDULES)}), rerun in the same phase.", ""]
    out += ["## GMM trajectory RMSE (SD discrete VP, exact denoiser; `benchmarks/gmm_solvers.py` problems)", "",
            f"Solvers: {', '.join(solvers)} (left out: {', '.join(skipped)}). Schedules: {', '.join(GMM_SCHEDULES)}. "
            "A solver takes the most steps whose NFE fits the budget. RMSE against the exact PF-ODE solution from "
            "the run's own first point (scipy DOP853, tol 1e-10).", "",
            "| problem | NFE | best now | RMSE | best before | RMSE | before / now |", "|---|---|---|---|---|---|---|"]
    for r in gsum:
        out.append(f"| {r['problem']} | {r['nfe']} | {r['best']} | {fmt(r['best_rmse'])} | {r['before']} | "
                   f"{fmt(r['before_rmse'])} | {fmt(r['ratio'])} |")
    out += ["", "## MNIST-FD (bundled model, N = 1,000; seed sets 0 / 100000 / 200000 where run)", ""]
    if msum:
        out += ["| NFE | best configuration (seed 0) | FD | mean (min-max) over seed sets | unipc_bh2 / leading | "
                "baseline / best |", "|---|---|---|---|---|---|"]
        for r in msum:
            b, base = r["best"], r["baseline"]
            out.append(f"| {r['nfe']} | {b['config']} | {fmt(b['seed0'])} | {fmt(b['mean'])} ({fmt(b['lo'])}-"
                       f"{fmt(b['hi'])}, {b['sets']} sets) | {fmt(base['seed0']) if base else '-'} | "
                       f"{fmt(r['ratio'])} |")
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
            out.append(f"| {solver} | " + " | ".join(row) + " |")
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
    figure(args, gsum, msum)
    log("\n".join(out[:60]))


def figure(args, gsum, msum) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, p in zip(axes[:2], PROBLEMS):
        rows = [r for r in gsum if r["problem"] == p]
        if rows:
            ax.semilogy([r["nfe"] for r in rows], [r["best_rmse"] for r in rows], "o-", label="best now")
            ax.semilogy([r["nfe"] for r in rows], [r["before_rmse"] for r in rows], "s--", label="best before issue 17")
        ax.set_title(f"GMM {p}: best trajectory RMSE")
        ax.set_xlabel("NFE")
        ax.legend()
    ax = axes[2]
    if msum:
        ax.semilogy([r["nfe"] for r in msum], [r["best"]["seed0"] for r in msum], "o-", label="best now (seed 0)")
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
    ap.add_argument("--phase", default="all", choices=["gmm", "screen", "full", "seeds", "report", "all"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/breadth_bench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--ref-cache", type=Path, default=Path("/tmp/breadth_bench/refs"))
    ap.add_argument("--gmm-samples", type=int, default=2048)
    ap.add_argument("--screen-samples", type=int, default=250)
    ap.add_argument("--top", type=int, default=3, help="screened configurations taken to N = 1,000")
    ap.add_argument("--seed-top", type=int, default=2, help="best N = 1,000 configurations given more seed sets")
    ap.add_argument("--seed-nfe", default="5", help="NFE values of the seeds phase, comma-separated")
    ap.add_argument("--full-nfe", default="4,5,6,8,10", help="NFE values of the full phase, comma-separated")
    ap.add_argument("--screen-solvers", default=",".join(MNIST_SOLVERS))
    ap.add_argument("--batch-size", type=int, default=500)
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
    phases = ["gmm", "screen", "full", "seeds", "report"] if args.phase == "all" else [args.phase]
    for phase in phases:
        log(f"== phase {phase} ({datetime.now(timezone.utc).isoformat(timespec='seconds')})")
        if phase == "gmm":
            phase_gmm(args, log)
        elif phase == "screen":
            solvers = [s for s in args.screen_solvers.split(",") if s]
            run_mnist([(s, sch, 5, 0, args.screen_samples) for s in solvers
                       for sch in (MNIST_SCHEDULES_ALL if s == solvers[0] else MNIST_SCHEDULES)], args, log)
        elif phase == "full":
            nfes = [int(v) for v in args.full_nfe.split(",") if v]
            run_mnist([(s, sch, n, 0, 1000) for n in nfes for s, sch in full_configs(args)], args, log)
        elif phase == "seeds":
            nfes = [int(v) for v in args.seed_nfe.split(",") if v]
            run_mnist([(s, sch, n, seed, 1000) for s, sch in seed_configs(args) for n in nfes for seed in SEED_SETS[1:]],
                      args, log)
        else:
            report(args, log)


if __name__ == "__main__":
    main()
