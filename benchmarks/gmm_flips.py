#!/usr/bin/env python
"""Where the 64-D mixture's rare "flips" come from, at NFE 15-20 (issue 17's GMM cells).

A flip is a noise that a solver sends into another mixture component than the exact probability-flow
ODE. At NFE 15-20 a handful of flips in thousands of noises decides the 64-D trajectory RMSE
(``benchmarks/breadth_bench.py``, reading 3). This script measures, on the held-out set of
``breadth_bench.py --phase gmm_big`` (seed ``NOISE_SEEDS["64d"] + 7777``, exact ODE endpoints from
``t_max``):

1. for built-in grids (uni_pc, uni_pc_bh2, ipndm x karras, karras:rho=5, exponential, linspace,
   trailing) and the LD3 grids of ``benchmarks/results/breadth_gmm.json`` that start at ``t_max``: the
   RMSE, the flip count, the median per-noise error and how many of the flipped noises are also
   flipped by ``--decide`` (the best pre-issue configuration);
2. for ``--decide``: at every step, for each noise it flips, whether the exact ODE continued from the
   solver's state there already ends in the wrong component, and the distance from the exact
   trajectory (exact ODE from ``t_max`` to that time).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/gmm_flips.py --out benchmarks/results

writes ``gmm_flips.{json,md,png}`` into ``--out``. This is a script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffsample.samplers import Sampler  # noqa: E402
from diffsample.samplers import schedule_optimizer as so  # noqa: E402
from diffsample.samplers.sampler import prior_scale  # noqa: E402
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, DiscreteVP  # noqa: E402
from diffsample.testbed.gmm import GaussianMixture  # noqa: E402
from breadth_bench import BIG_SEED_OFFSET, T_MAX  # noqa: E402
from gmm_solvers import NOISE_SEEDS, PROBLEMS, SD_BETAS, References, flipped, rmse  # noqa: E402

BUILTIN = [(s, sc) for s in ("uni_pc", "uni_pc_bh2", "ipndm")
           for sc in ("karras:rho=5", "karras", "exponential", "linspace", "trailing")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--samples", type=int, default=16384, help="held-out noises (a gmm_big set)")
    ap.add_argument("--decide", default="uni_pc_bh2 / karras:rho=5", help="configuration of the per-step analysis")
    ap.add_argument("--grids", type=Path, default=Path("benchmarks/results/breadth_gmm.json"),
                    help="breadth_bench results holding the optimised grids")
    ap.add_argument("--ref-cache", type=Path, default=Path("/tmp/breadth_bench/refs"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    ns = DiscreteVP.from_config(SD_BETAS)
    gmm = GaussianMixture.random(**PROBLEMS["64d"])
    den = gmm.denoiser(ns)
    noise = torch.randn(args.samples, 64, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(NOISE_SEEDS["64d"] + BIG_SEED_OFFSET))
    ref = References(gmm, ns, noise, 1e-10, args.ref_cache, "64dbig")(T_MAX)

    def score(name: str, x: torch.Tensor) -> dict:
        err = ((x - ref) ** 2).mean(1).sqrt()
        index = torch.nonzero(flipped(gmm, x, ref)).flatten().tolist()
        return dict(config=name, rmse=rmse(x, ref), flips=len(index), median_error=float(err.median()),
                    flipped=index)

    rows = []
    for solver, sched in BUILTIN:
        x = Sampler(SOLVERS.create(solver), STEP_SCHEDULES.create(sched), args.nfe)(den, noise).x
        rows.append(score(f"{solver} / {sched}", x) | dict(kind="built-in"))
    cells = json.loads(args.grids.read_text())["optimised_cells"]
    for c in cells:
        if c["problem"] != "64d" or c["nfe_target"] != args.nfe or c.get("t0") is None or c["t0"] < T_MAX - 1e-6:
            continue
        t_model = c.get("t_model")
        x = so.run_solver(SOLVERS.create(c["solver"]), den, ns, noise, torch.tensor(c["t"], dtype=torch.float64),
                          None if t_model is None else torch.tensor(t_model, dtype=torch.float64))
        rows.append(score(f"{c['solver']} / {c['schedule']}", x) | dict(kind="optimised", t=c["t"]))
    decide = next(r for r in rows if r["config"] == args.decide)
    for r in rows:
        r["shared_with_decide"] = len(set(r["flipped"]) & set(decide["flipped"]))

    # per-step analysis of --decide's flips
    solver, sched = (s.strip() for s in args.decide.split("/", 1))
    idx = torch.tensor(decide["flipped"], dtype=torch.long)
    states = []
    Sampler(SOLVERS.create(solver), STEP_SCHEDULES.create(sched), args.nfe)(
        den, noise[idx], callback=lambda info: states.append((info.i, info.x.clone(), info.grid)))
    grid = states[0][2]
    x_start = noise[idx] * prior_scale(grid)  # the sampler's first state, at t_max
    steps = []
    for i, x, _ in states:
        t_next = grid.t_list[i + 1]
        if t_next <= 0:
            break
        cont = gmm.reference_ode(x, ns, t_next, None, rtol=1e-9, atol=1e-9)
        exact = gmm.reference_ode(x_start, ns, grid.t_list[0], t_next, rtol=1e-10, atol=1e-10)
        steps.append(dict(step=i, t=t_next,
                          wrong=flipped(gmm, cont, ref[idx]).int().tolist(),
                          distance=((x - exact) ** 2).sum(1).sqrt().tolist()))
    write(args, rows, decide, steps, time.perf_counter() - start)


def write(args, rows, decide, steps, seconds) -> None:
    command = "OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command,
                seconds=round(seconds, 1), nfe=args.nfe, samples=args.samples, decide=args.decide,
                versions=dict(python=platform.python_version(), torch=torch.__version__))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gmm_flips.json").write_text(json.dumps(dict(meta=meta, configs=rows, decide_steps=steps), indent=1))
    out = [f"# Flips on the 64-D mixture at NFE {args.nfe} ({args.samples:,} held-out noises)", "",
           "```bash", command, "```", "", f"{meta['date']}; {seconds / 60:.1f} min; torch {torch.__version__}.", "",
           "A flip: a noise that ends in another mixture component than the exact ODE from t_max. "
           f"'shared': flipped noises also flipped by `{args.decide}`.", "",
           "| configuration | kind | RMSE | flips | shared | median per-noise error |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["rmse"]):
        out.append(f"| {r['config']} | {r['kind']} | {r['rmse']:.4g} | {r['flips']} | {r['shared_with_decide']} | "
                   f"{r['median_error']:.3g} |")
    out += ["", f"Per step of `{args.decide}` for its {decide['flips']} flipped noises: how many already end in the "
            "wrong component when the exact ODE is continued from the solver's state at that time, and the median "
            "distance from the exact trajectory there:", "",
            "| step | t | wrong when continued | median distance |", "|---|---|---|---|"]
    for s in steps:
        out.append(f"| {s['step']} | {s['t']:.1f} | {sum(s['wrong'])} of {len(s['wrong'])} | "
                   f"{statistics.median(s['distance']):.2g} |")
    (args.out / "gmm_flips.md").write_text("\n".join(out) + "\n")
    figure(args, rows)
    print("\n".join(out))


def figure(args, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, marker in (("built-in", "o"), ("optimised", "s")):
        sel = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["median_error"] for r in sel], [r["flips"] for r in sel], marker=marker, label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("median per-noise error (RMS over 64 dims)")
    ax.set_ylabel(f"flips of {args.samples:,} noises")
    ax.set_title(f"64-D mixture, NFE {args.nfe}: flips against typical error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "gmm_flips.png", dpi=120)


if __name__ == "__main__":
    main()
