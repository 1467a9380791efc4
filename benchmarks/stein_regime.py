"""SteinDiff in the paper's own regime (issue 20): Heun at 3-4 steps, DPM-Solver++(2M) and UniPC at
3-6 steps, Karras and logSNR (lambda_uniform) grids, on the exact GMM (EDM: VE 0.002-80) and the
bundled MNIST model (VP); plain vs the project's variant (``stein_dpm``'s options), the paper's
Algorithm 1 (``stein_paper``, native and EDM coordinates) and the look-ahead hypothesis
(``stein_lookahead``), each also against the plain solver given the same ``model_evals``.

Usage (CPU, one thread; the sub-commands append to one JSON file and skip cells already there):

    python benchmarks/stein_regime.py gmm   [--seeds 0,1,2] [--batch 2000]
    python benchmarks/stein_regime.py mnist [--n 500] [--seeds 0] [--variants ...] [--cells ...]
    python benchmarks/stein_regime.py report            (markdown + figure from the JSON)

Writes ``benchmarks/results/stein_regime.json`` (every row: testbed, schedule, base, steps, nfe,
model_evals, variant, seed set, metric, gamma per step, the command that produced it, versions),
``stein_regime.md`` and ``stein_regime.png``. MNIST: FD in the bundled classifier's features vs the
1,000 held-out digits (``diffsample.testbed.mnist.mnist_fd``; biased by N, compare at equal N),
labels ``i % 10``, seed set ``s``: ``seeded_noise(range(s, s + n))``, one batch of ``n`` (the Stein
statistics are batch means). GMM: sliced W2 against 20k exact samples and the within-mode
variance ratio (1 is right), noise from ``torch.Generator().manual_seed(seed)``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from diffsample.samplers import Sampler
from diffsample.solvers import VE, DPMSolverPP, Heun, Karras, LambdaUniform, SteinDiff, UniPC
from diffsample.solvers.stein import stein_trace
from diffsample.solvers.stein_lookahead import SteinLookahead

RESULTS = Path(__file__).resolve().parent / "results"

BASES = {"heun": Heun(), "dpmpp_2m": DPMSolverPP(order=2), "unipc_bh2": UniPC(predictor_order=2, variant="bh2")}
STEPS = {"heun": (3, 4), "dpmpp_2m": (3, 4, 5, 6), "unipc_bh2": (3, 4, 5, 6)}
SCHEDULES = {"karras": Karras(), "lambda_uniform": LambdaUniform()}

# variant -> (builder(base) or None when it does not apply to the base, registry spelling)
VARIANTS = {
    "plain": (lambda b: b, "<base>"),
    "own": (lambda b: SteinDiff(b), "stein_dpm options: transition coupling, first step, gamma in [0.5, 2]"),
    "paper": (lambda b: SteinDiff(b, coupling="marginal", apply_steps="all", gamma_min=0.0, gamma_max=None),
              "stein_paper:base=<base>"),
    "paper_edm": (lambda b: SteinDiff(b, coupling="marginal", apply_steps="all", gamma_min=0.0, gamma_max=None,
                                      param_space="edm"), "stein_paper:base=<base>,param_space=edm"),
    "lookahead": (lambda b: None if isinstance(b, UniPC) else SteinLookahead(b), "stein_lookahead:base=<base>"),
    "lookahead_free": (lambda b: None if isinstance(b, UniPC) else SteinLookahead(b, gamma_min=None, gamma_max=None),
                       "stein_lookahead:base=<base>,gamma_min=None,gamma_max=None"),
    "lookahead_bl": (lambda b: None if isinstance(b, UniPC) else SteinLookahead(b, gamma_min=None, gamma_max=None,
                                                                                apply_steps="all_but_last"),
                     "stein_lookahead:base=<base>,gamma_min=None,gamma_max=None,apply_steps=all_but_last"),
}


def versions() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "threads": torch.get_num_threads()}


OUT = [RESULTS / "stein_regime.json"]  # --out replaces it (smoke runs)


def load() -> dict:
    return json.loads(OUT[0].read_text()) if OUT[0].exists() else {"commands": [], "rows": []}


def save(payload: dict) -> None:
    OUT[0].parent.mkdir(parents=True, exist_ok=True)
    OUT[0].write_text(json.dumps(payload, indent=1))


def equal_eval_steps(base, sched, ns, evals: float) -> int:
    """Fewest steps of ``base`` whose run costs at least ``evals`` model evaluations per sample."""
    steps = 1
    while base.nfe(Sampler(base, sched, steps).grid(ns)) < evals - 1e-9:
        steps += 1
    return steps


class Cells:
    """Runs one testbed's cells, appending rows to the JSON payload (skips rows already present)."""

    def __init__(self, testbed: str, run_one, payload: dict, command: str, size: int) -> None:
        self.testbed, self.run_one, self.payload, self.command, self.size = testbed, run_one, payload, command, size

    def have(self, key: dict) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.payload["rows"])

    def run(self, schedule: str, base_name: str, steps: int, variant: str, seed: int, ns, equal_for: str | None = None):
        key = {"testbed": self.testbed, "n": self.size, "schedule": schedule, "base": base_name, "steps": steps,
               "variant": variant if equal_for is None else "plain", "seed": seed}
        if self.have(key):
            return next(r for r in self.payload["rows"] if all(r.get(k) == v for k, v in key.items()))
        solver = VARIANTS[variant][0](BASES[base_name]) if equal_for is None else BASES[base_name]
        sched = SCHEDULES[schedule]
        t0 = time.time()
        with stein_trace() as trace:
            res, metrics = self.run_one(Sampler(solver, sched, steps, allow_nonfinite=True), seed)
        gam = [{"i": r.i, "sigma": r.sigma, "gamma_raw": float(r.gamma_raw[0]), "gamma": float(r.gamma[0]),
                "fallback": r.fallback} for r in trace if r.corrected]
        row = {**key, "nfe": res.nfe, "model_evals": res.model_evals, **metrics, "gammas": gam,
               "fallbacks": sum(g["fallback"] for g in gam), "wall_s": round(time.time() - t0, 1),
               "spec": VARIANTS[key["variant"]][1].replace("<base>", base_name), "command": self.command}
        self.payload["rows"].append(row)
        save(self.payload)
        short = {k: row[k] for k in ("schedule", "base", "steps", "variant", "seed", "nfe", "model_evals")}
        print(json.dumps({**short, **{k: round(v, 4) for k, v in metrics.items()},
                          "gamma": [round(g["gamma_raw"], 3) for g in gam][:6], "s": row["wall_s"]}), flush=True)
        return row

    def sweep(self, variants, cells, seeds, ns, equal_evals: bool) -> None:
        for seed in seeds:
            for schedule, base_name, steps in cells:
                for v in variants:
                    if VARIANTS[v][0](BASES[base_name]) is None:
                        continue
                    row = self.run(schedule, base_name, steps, v, seed, ns)
                    if equal_evals and v != "plain":
                        eq = equal_eval_steps(BASES[base_name], SCHEDULES[schedule], ns, row["model_evals"])
                        self.run(schedule, base_name, eq, v, seed, ns, equal_for=v)


def parse_cells(text: str) -> list[tuple[str, str, int]]:
    """``karras/dpmpp_2m/3,lambda_uniform/heun/4`` or ``all`` (every schedule x base x its steps)."""
    if text == "all":
        return [(s, b, n) for s in SCHEDULES for b in BASES for n in STEPS[b]]
    out = []
    for c in text.split(","):
        s, b, n = c.split("/")
        if s not in SCHEDULES or b not in BASES:
            raise ValueError(f"cell {c!r}: schedule must be one of {', '.join(SCHEDULES)}, base one of {', '.join(BASES)}")
        out.append((s, b, int(n)))
    return out


# ---- testbeds -------------------------------------------------------------------------------------
def run_gmm(args, payload) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stein_study import Metrics, circle_gmm

    ns = VE(sigma_min=0.002, sigma_max=80.0)
    for dim in args.dims:
        gmm = circle_gmm(dim)
        metrics = Metrics(gmm)
        den = gmm.denoiser(ns)

        def run_one(sampler, seed, dim=dim, den=den, metrics=metrics):
            noise = torch.randn(args.batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            res = sampler(den, noise)
            return res, {k: v for k, v in metrics(res.x).items() if k in ("sw2", "var_ratio")}

        Cells(f"gmm{dim}", run_one, payload, " ".join(sys.argv), args.batch).sweep(args.variants, args.cells, args.seeds, ns,
                                                                      args.equal_evals)


def run_mnist(args, payload) -> None:
    from diffsample.run.models import load_model
    from diffsample.samplers.seeds import seeded_noise
    from diffsample.testbed import mnist

    model = load_model("mnist")
    labels = torch.arange(args.n) % 10
    cond = model.cond(labels)

    def run_one(sampler, seed):
        noise = seeded_noise(range(seed, seed + args.n), model.sample_shape)
        res = sampler(model.denoiser, noise, cond)
        x = res.x.float()
        fd = mnist.mnist_fd(x.clamp(-1, 1)) if torch.isfinite(x).all() else math.inf
        return res, {"fd": fd}

    Cells("mnist", run_one, payload, " ".join(sys.argv), args.n).sweep(args.variants, args.cells, args.seeds,
                                                               model.denoiser.noise_schedule, args.equal_evals)


# ---- report -------------------------------------------------------------------------------------
LABELS = {"plain": "plain", "own": "own variant (stein_dpm options)", "paper": "stein_paper",
          "paper_edm": "stein_paper, edm space", "lookahead": "stein_lookahead", "lookahead_free": "stein_lookahead, no clip",
          "lookahead_bl": "stein_lookahead, no clip, all_but_last"}


def _gmean(v):
    v = [x for x in v if x is not None]
    return math.exp(sum(math.log(max(x, 1e-12)) for x in v) / len(v)) if v else None


def report(payload) -> str:
    rows = payload["rows"]
    metric_of = lambda tb: "fd" if tb == "mnist" else "sw2"  # noqa: E731
    index: dict = {}
    for r in rows:
        index.setdefault((r["testbed"], r["n"], r["schedule"], r["base"], r["steps"], r["variant"]), {})[r["seed"]] = r
    f = lambda x: "inf" if x is None or not math.isfinite(x) else f"{x:.3g}"  # noqa: E731

    def mean(vals):
        return sum(vals) / len(vals) if vals and all(math.isfinite(v) for v in vals) else None

    lines = ["# SteinDiff in the paper's regime (issue 20)\n",
             "Findings and the targets: benchmarks/RESULTS.md, section \"The paper's regime: `stein_paper`, "
             "`stein_lookahead`\".\n",
             "Written by `python benchmarks/stein_regime.py report` from `stein_regime.json`. Versions: "
             f"{payload.get('versions')}. The runs, in order, with the rows each produced (a run with fewer rows "
             "than its cells was stopped early; rows already present are not rerun):\n",
             *[f"* `{c}`: {sum(r['command'] == c for r in rows)} rows" for c in dict.fromkeys(payload["commands"])],
             "",
             "Metric: MNIST-FD of the bundled model (lower is better; N = n samples per cell, one batch) and, on the "
             "exact 8-mode circle GMM (d = 2 and 16) under EDM (VE sigma 0.002-80, alpha = 1), sliced W2 vs 20k exact "
             "samples (batch 2000). Each value is the mean over the seed sets listed; 'plain' and 'plain eq' are "
             "means over the same seed sets. Ratio = variant / plain at the same steps (mean of per-seed ratios, "
             "range in brackets when several seeds). 'plain eq' = the plain solver with the fewest steps costing at "
             "least the variant's model_evals (a Stein step's VJPs count 2 model evals each). inf = non-finite.\n"]
    groups = sorted({(k[0], k[1]) for k in index}, key=lambda t: (t[0] != "mnist", t))
    for tb, n in groups:
        m = metric_of(tb)
        lines.append(f"\n## {tb} (n = {n}): {m}\n")
        lines.append("| schedule | base | steps | nfe | variant | model_evals | plain | variant value | ratio | plain eq (steps) | seeds |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in SCHEDULES:
            for b in BASES:
                for k in STEPS[b]:
                    plain = index.get((tb, n, s, b, k, "plain"), {})
                    for v in VARIANTS:
                        rs = index.get((tb, n, s, b, k, v))
                        if v == "plain" or not rs:
                            continue
                        seeds = sorted(rs)
                        val = mean([rs[x][m] for x in seeds])
                        p = mean([plain[x][m] for x in seeds]) if all(x in plain for x in seeds) else None
                        ratios = [rs[x][m] / plain[x][m] for x in seeds if x in plain and math.isfinite(rs[x][m])]
                        ratio = "—" if val is None or p is None else f"{sum(ratios) / len(ratios):.2f}" + (
                            f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else "")
                        ev = rs[seeds[0]]["model_evals"]
                        # every grid here ends at sigma = 0: Heun makes 2 steps - 1 calls, the others 1 per step
                        eq_steps = math.ceil((ev + 1) / 2 - 1e-9) if b == "heun" else math.ceil(ev - 1e-9)
                        eq_rows = index.get((tb, n, s, b, eq_steps, "plain"), {})
                        eq_seeds = [x for x in seeds if x in eq_rows]
                        eq = mean([eq_rows[x][m] for x in eq_seeds])
                        eq_txt = "—" if not eq_seeds else f"{f(eq)} ({eq_steps})" + (
                            "" if eq_seeds == seeds else f" seeds {','.join(map(str, eq_seeds))}")
                        p_txt = "—" if p is None and not all(x in plain for x in seeds) else f(p)
                        lines.append(f"| {s} | {b} | {k} | {rs[seeds[0]]['nfe']} | {LABELS[v]} | {ev:.0f} | {p_txt} | "
                                     f"{f(val)} | {ratio} | {eq_txt} | {','.join(map(str, seeds))} |")
    lines.append("\n## Gamma per step (first seed set; raw estimate before the clip, sigma of the corrected step's start)\n")
    lines.append("| testbed | schedule | base | steps | variant | gamma_raw (sigma) |")
    lines.append("|---|---|---|---|---|---|")
    for (tb, n, s, b, k, v), rs in sorted(index.items(), key=lambda kv: tuple(map(str, kv[0]))):
        first = rs[min(rs)]
        if v == "plain" or not first["gammas"]:
            continue
        g = ", ".join(f"{x['gamma_raw']:.3g} ({x['sigma']:.3g})" for x in first["gammas"])
        lines.append(f"| {tb} | {s} | {b} | {k} | {LABELS[v]} | {g} |")
    return "\n".join(lines) + "\n"


def figure(payload, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    testbeds = sorted({r["testbed"] for r in rows}, key=lambda t: (t != "mnist", t))
    fig, axes = plt.subplots(len(testbeds) * 2, 3, figsize=(13, 3.2 * 2 * len(testbeds)), squeeze=False)
    from matplotlib.ticker import NullFormatter

    markers = {"plain": "o", "own": "s", "paper": "x", "paper_edm": "+", "lookahead": "^", "lookahead_free": "v",
               "lookahead_bl": "D"}
    colors = dict(zip(VARIANTS, ["k", "tab:orange", "tab:green", "tab:olive", "tab:red", "tab:purple", "tab:brown"]))
    handles = {}
    for ti, tb in enumerate(testbeds):
        m = "fd" if tb == "mnist" else "sw2"
        for si, s in enumerate(SCHEDULES):
            for bi, b in enumerate(BASES):
                ax = axes[2 * ti + si][bi]
                for v in VARIANTS:
                    pts: dict = {}
                    for r in rows:
                        if (r["testbed"], r["schedule"], r["base"], r["variant"]) == (tb, s, b, v) and math.isfinite(r[m]):
                            pts.setdefault(r["model_evals"], []).append(r[m])
                    if not pts:
                        continue
                    xs = sorted(pts)
                    (h,) = ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker=markers[v], color=colors[v],
                                   linestyle="-" if v == "plain" else "none", label=LABELS[v])
                    handles[v] = h
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_title(f"{tb} {s} {b}", fontsize=9)
                ax.set_xlabel("model_evals per sample")
                ax.set_ylabel(m)
    fig.legend([handles[v] for v in VARIANTS if v in handles], [LABELS[v] for v in VARIANTS if v in handles],
               loc="upper center", ncol=4, fontsize=8)
    fig.suptitle("mean over seed sets; plain (line) at every step count run, incl. the equal-model_evals ones",
                 y=0.005, fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.01, 1, 0.975))
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["gmm", "mnist", "report"])
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=[2, 16])
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--cells", type=parse_cells, default=parse_cells("all"))
    p.add_argument("--no-equal-evals", dest="equal_evals", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args()
    OUT[0] = args.out / "stein_regime.json"
    torch.set_num_threads(1)
    payload = load()
    if args.what != "report":
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant {unknown[0]!r}; valid: {', '.join(VARIANTS)}")
        payload["commands"].append(" ".join(sys.argv))
        payload["versions"] = versions()
        (run_gmm if args.what == "gmm" else run_mnist)(args, payload)
        save(payload)
    (args.out / "stein_regime.md").write_text(report(payload))
    figure(payload, args.out / "stein_regime.png")
    print(f"wrote {OUT[0]}, stein_regime.md, stein_regime.png", flush=True)


if __name__ == "__main__":
    main()
