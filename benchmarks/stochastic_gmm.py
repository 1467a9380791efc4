"""Stochastic samplers on exact Gaussian mixtures: distribution error against exact samples at equal NFE.

Stochastic solvers have no trajectory to compare against the exact ODE, so they are scored by the
law of their samples: the sliced 1-Wasserstein distance (SW1, 256 random directions) between the
N generated samples and N exact samples of the mixture, and the total variation between their
component proportions (each sample assigned to its most probable component at sigma = 0). The
noise floors are both measures between two independent exact samples of size N.

Problems: ``GaussianMixture.random(dim=2, components=8, seed=0)`` and ``(dim=16, components=8,
seed=1)`` under Stable Diffusion's discrete VP process (scaled_linear), Karras steps, the exact
denoiser; three seed sets (initial noise, step noise and exact reference samples change together).
Every registered stochastic solver of docs/methods/stochastic_solvers_breadth.md, with the
stochastic solvers diffsample had before (euler_ancestral = DDPM, dpmpp_2m_sde, dpmpp_3m_sde) in
the same run, at NFE 10, 20 and 40 (steps = the largest count whose nfe does not exceed the budget).

    OMP_NUM_THREADS=1 python benchmarks/stochastic_gmm.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, DiscreteVP, Karras
from diffsample.testbed.gmm import GaussianMixture

ROOT = Path(__file__).resolve().parent
BASELINES = ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"]
BREADTH = ["dpmpp_2s_ancestral", "dpmpp_sde", "sa_solver", "sa_solver:order2_term=false", "sa_solver_pece",
           "er_sde", "seeds_2", "seeds_3", "restart"]
PROBLEMS = {"2d": dict(dim=2, components=8, seed=0), "16d": dict(dim=16, components=8, seed=1)}
NS = DiscreteVP.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})


def sliced_w1(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 1-Wasserstein distance between equal-size samples ``a``, ``b`` of shape ``(N, D)``."""
    pa, pb = (a @ directions.T).sort(0).values, (b @ directions.T).sort(0).values
    return float((pa - pb).abs().mean())


def proportions(gmm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Component proportions of ``x``, each sample assigned to its most probable component."""
    counts = torch.bincount(gmm.component_posterior(x).argmax(1), minlength=gmm.weights.numel()).double()
    return counts / counts.sum()


def proportions_tv(gmm: GaussianMixture, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Total variation between the argmax component proportions of ``x`` and of exact samples ``ref``
    (overlapping components make argmax proportions differ from the weights even for exact samples)."""
    return float(0.5 * (proportions(gmm, x) - proportions(gmm, ref)).abs().sum())


def steps_for(name: str, nfe: int) -> int | None:
    """Largest step count whose run makes at most ``nfe`` denoiser calls (None: none fits)."""
    solver, best = SOLVERS.create(name), None
    for steps in range(1, nfe + 1):
        grid = Sampler(solver, Karras(), steps).grid(NS)
        if solver.nfe(grid) <= nfe:
            best = steps
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, rows, floors = args.samples, [], {}
    start = time.perf_counter()
    for pname, spec in PROBLEMS.items():
        gmm = GaussianMixture.random(**spec)
        den = gmm.denoiser(NS)
        directions = torch.nn.functional.normalize(
            torch.randn(256, gmm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(99)), dim=1)
        floor, tv_floor = [], []
        for seed in args.seeds:
            ref = gmm.sample(n, generator=torch.Generator().manual_seed(1000 + seed))
            ref2 = gmm.sample(n, generator=torch.Generator().manual_seed(2000 + seed))
            floor.append(sliced_w1(ref, ref2, directions))
            tv_floor.append(proportions_tv(gmm, ref2, ref))
            for nfe in args.nfe:
                for name in BASELINES + BREADTH:
                    steps = steps_for(name, nfe)
                    if steps is None:
                        continue
                    gen = torch.Generator().manual_seed(seed)
                    noise = torch.randn(n, gmm.dim, dtype=torch.float64, generator=gen)
                    draw = lambda *_: torch.randn(n, gmm.dim, dtype=torch.float64, generator=gen)  # noqa: E731
                    res = Sampler(SOLVERS.create(name), Karras(), steps)(den, noise, noise_fn=draw)
                    row = {"problem": pname, "seed": seed, "nfe_budget": nfe, "solver": name, "steps": steps,
                           "nfe": res.nfe, "sw1": round(sliced_w1(res.x, ref, directions), 5),
                           "proportion_tv": round(proportions_tv(gmm, res.x, ref), 5)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        floors[pname] = {"sw1": round(sum(floor) / len(floor), 5), "tv": round(sum(tv_floor) / len(tv_floor), 5)}
    record = {"command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv), "samples": n, "nfe": args.nfe,
              "seeds": args.seeds, "problems": PROBLEMS, "noise_floor": floors, "rows": rows,
              "wall_s": round(time.perf_counter() - start, 1), "platform": platform.platform(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stochastic_gmm.json").write_text(json.dumps(record, indent=1))
    md = markdown(record)
    (out / "stochastic_gmm.md").write_text(md)
    figure(record, out / "stochastic_gmm.png")
    print(md)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))


def markdown(record: dict) -> str:
    lines = ["# Stochastic samplers on exact Gaussian mixtures", "",
             f"`{record['command']}` — {record['date']}, torch {record['torch']}, {record['wall_s']} s; "
             f"{record['samples']} samples, seeds {record['seeds']}, Karras steps on SD's discrete VP process, "
             "exact denoiser. SW1: sliced 1-Wasserstein distance to exact samples (mean ± sd over seeds; "
             f"noise floor between two exact samples: {record['noise_floor']}). TV: total variation between the "
             "argmax component proportions of the samples and of the exact samples. Ratio: SW1 over the best previously available stochastic solver (euler_ancestral, "
             "dpmpp_2m_sde, dpmpp_3m_sde) at the same NFE budget.", ""]
    for pname in record["problems"]:
        lines += [f"## {pname}", "", "| NFE | solver | steps | SW1 | TV | SW1 / best baseline |", "|---|---|---|---|---|---|"]
        for nfe in record["nfe"]:
            cells = {}
            for r in record["rows"]:
                if r["problem"] == pname and r["nfe_budget"] == nfe:
                    cells.setdefault(r["solver"], []).append(r)
            base = min(_mean_sd([r["sw1"] for r in cells[b]])[0] for b in BASELINES if b in cells)
            for name, rs in sorted(cells.items(), key=lambda kv: _mean_sd([r["sw1"] for r in kv[1]])[0]):
                sw, sw_sd = _mean_sd([r["sw1"] for r in rs])
                tv, tv_sd = _mean_sd([r["proportion_tv"] for r in rs])
                lines.append(f"| {nfe} | {name} | {rs[0]['steps']} | {sw:.4f} ± {sw_sd:.4f} | {tv:.4f} ± {tv_sd:.4f} "
                             f"| {sw / base:.2f} |")
        lines.append("")
    return "\n".join(lines)


def figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(record["problems"]), figsize=(11, 4))
    colours = dict(zip(BASELINES + BREADTH, plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]))
    for ax, pname in zip(axes, record["problems"]):
        for name in BASELINES + BREADTH:
            pts = []
            for nfe in record["nfe"]:
                rs = [r["sw1"] for r in record["rows"] if r["problem"] == pname and r["solver"] == name
                      and r["nfe_budget"] == nfe]
                if rs:
                    pts.append((nfe, sum(rs) / len(rs)))
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="--" if name in BASELINES else "-", color=colours[name], label=name)
        ax.axhline(record["noise_floor"][pname]["sw1"], color="k", lw=0.8, label="noise floor")
        ax.set(xscale="log", yscale="log", xlabel="NFE budget", ylabel="SW1 to exact samples", title=pname)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
