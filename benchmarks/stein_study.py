"""SteinDiff study and benchmark (issue 4): GMM study, contractivity diagnostic, MNIST benchmark.

Usage (CPU; one thread):

    python benchmarks/stein_study.py gmm        [--batch 2000] [--out benchmarks/results]
    python benchmarks/stein_study.py lipschitz  [--batch 2000]
    python benchmarks/stein_study.py mnist      [--n 1000] [--variants plain-dpm,stein-dpm,dpm:<variant>] [--nfe 4,5,6,8,10,20]
    python benchmarks/stein_study.py summary    (aggregates stein_gmm.json into stein_gmm_summary.md)
    python benchmarks/stein_study.py merge --merge a/stein_mnist.json,b/stein_mnist.json  (parallel MNIST runs)

Every sub-command writes ``benchmarks/results/stein_<name>.json`` (rows + the exact command, N,
versions) and a markdown table ``stein_<name>.md``. Plain solvers are compared with the Stein
variants at equal ``nfe`` and at equal ``model_evals`` (the plain solver gets the extra budget:
``steps = round(model_evals of the Stein run)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
from pathlib import Path

import torch

from diffsample.samplers import Sampler
from diffsample.solvers import VE, DPMSolverPP, Karras, LambdaUniform, LinearVP, SteinDiff, UniPC
from diffsample.solvers.stein import stein_trace

RESULTS = Path(__file__).resolve().parent / "results"

BASES = {"dpm": DPMSolverPP(order=2), "unipc": UniPC(predictor_order=2, variant="bh2")}

# Stein variants studied (SteinDiff keyword arguments; probes=5, gaussian, vjp, batch unless set).
VARIANTS: dict[str, dict] = {
    "literal": dict(coupling="marginal", apply_steps="all", gamma_min=None, gamma_max=None),
    "marg-all-clip": dict(coupling="marginal", apply_steps="all", gamma_min=0.5, gamma_max=2.0),
    "marg-all-edm-clip": dict(coupling="marginal", apply_steps="all", param_space="edm", gamma_min=0.5, gamma_max=2.0),
    "trans-all-edm-clip": dict(coupling="transition", apply_steps="all", param_space="edm", gamma_min=0.5, gamma_max=2.0),
    "trans-allbutlast-edm-clip": dict(coupling="transition", apply_steps="all_but_last", param_space="edm", gamma_min=0.5, gamma_max=2.0),
    "marg-first1-clip": dict(coupling="marginal", apply_steps=1, gamma_min=0.5, gamma_max=2.0),
    "marg-first1-edm-clip": dict(coupling="marginal", apply_steps=1, param_space="edm", gamma_min=0.5, gamma_max=2.0),
    "trans-first1-clip": dict(coupling="transition", apply_steps=1, gamma_min=0.5, gamma_max=2.0),
    "trans-first1-edm-clip": dict(coupling="transition", apply_steps=1, param_space="edm", gamma_min=0.5, gamma_max=2.0),
    "trans-first1-edm-persample": dict(coupling="transition", apply_steps=1, param_space="edm", stats="per_sample", gamma_min=0.5, gamma_max=2.0),
    "trans-first2-edm-clip": dict(coupling="transition", apply_steps=2, param_space="edm", gamma_min=0.5, gamma_max=2.0),
    "trans-all-edm-damped": dict(coupling="transition", apply_steps="all", param_space="edm", gamma_min=0.9, gamma_max=1.1),
}


def versions() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def write(name: str, payload: dict, md: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"stein_{name}.json").write_text(json.dumps(payload, indent=1))
    (out / f"stein_{name}.md").write_text(md)
    print(f"wrote {out / f'stein_{name}.json'} and .md", flush=True)


# ---- GMM ------------------------------------------------------------------------------------------
def circle_gmm(dim: int):
    from diffsample.testbed.gmm import GaussianMixture

    k = 8
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = torch.zeros(k, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = 4 * ang.cos(), 4 * ang.sin()
    return GaussianMixture(means, torch.full((k,), 0.3), torch.ones(k))


SETTINGS = {  # name -> (noise schedule, step schedule)
    "EDM": (VE(sigma_min=0.002, sigma_max=80.0), Karras(rho=7.0)),
    "VP": (LinearVP(beta_0=0.1, beta_1=20.0, t_min=1e-3, t_max=1.0), LambdaUniform()),
}


class Metrics:
    """Sliced W2 (64 fixed directions vs 20k exact samples), within-mode variance ratio, coverage."""

    def __init__(self, gmm, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.gmm = gmm
        self.dirs = torch.randn(gmm.dim, 64, generator=g, dtype=torch.float64)
        self.dirs /= self.dirs.norm(dim=0, keepdim=True)
        ref = gmm.sample(20000, generator=g)
        self.ref_sorted = (ref @ self.dirs).sort(0).values

    def __call__(self, x: torch.Tensor) -> dict:
        x = x.reshape(x.shape[0], -1).double()
        if not torch.isfinite(x).all():
            return {"sw2": math.inf, "var_ratio": math.inf, "coverage": 0.0}
        proj = (x @ self.dirs).sort(0).values
        q = (torch.arange(x.shape[0], dtype=torch.float64) + 0.5) / x.shape[0]
        idx = (q * self.ref_sorted.shape[0]).long().clamp(max=self.ref_sorted.shape[0] - 1)
        sw2 = float(((proj - self.ref_sorted[idx]) ** 2).mean().sqrt())
        dist = torch.cdist(x, self.gmm.means)
        j = dist.argmin(1)
        within = ((x - self.gmm.means[j]) ** 2).sum(1).mean() / self.gmm.dim
        var_ratio = float(within / self.gmm.stds[0] ** 2)
        share = torch.bincount(j, minlength=self.gmm.means.shape[0]).double() / x.shape[0]
        return {"sw2": sw2, "var_ratio": var_ratio, "coverage": float(share.min() * share.numel())}


@dataclasses.dataclass(frozen=True)
class OracleGamma:
    """Study-only diagnostic (not a library solver): the best scalar move along ``u`` towards the
    exact probability-flow target ``Phi(x)`` (batch gamma, reference ODE), on the first ``k`` steps.
    Bounds what any batch-scalar correction along the residual can achieve."""

    base: object
    gmm: object
    k: int

    order = 0
    stochastic = False

    def init(self, x, grid):
        return self.base.init(x, grid)

    def nfe(self, grid):
        return self.base.nfe(grid)

    def step(self, denoise, x, grid, i, state, noise_fn=None):
        x_next, state = self.base.step(denoise, x, grid, i, state, noise_fn)
        if i >= self.k:
            return x_next, state
        t_end = None if grid.sigma_list[i + 1] == 0 else grid.t_list[i + 1]
        target = self.gmm.reference_ode(x, grid.noise_schedule, grid.t_list[i], t_end, rtol=1e-8, atol=1e-8)
        u = x - x_next
        gamma = float(((u * (x - target)).sum()) / (u * u).sum())
        return x - gamma * u, state


def run_gmm(args) -> None:
    rows = []
    for dim in (2, 16):
        gmm = circle_gmm(dim)
        metrics = Metrics(gmm)
        for setting, (ns, sched) in SETTINGS.items():
            den = gmm.denoiser(ns)
            noise = torch.randn(args.batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
            for nfe in args.nfe:
                for base_name, base in BASES.items():
                    def record(variant, solver, steps, extra=None):
                        torch.manual_seed(11)
                        with stein_trace() as trace:
                            res = Sampler(solver, sched, steps)(den, noise)
                        gammas = [float(r.gamma_raw[0]) for r in trace if r.corrected]
                        row = {"dim": dim, "setting": setting, "base": base_name, "variant": variant,
                               "target_nfe": nfe, "steps": steps, "nfe": res.nfe, "model_evals": res.model_evals,
                               "wall_s": round(res.wall_time_s, 3), **metrics(res.x),
                               "gamma_raw": gammas[:4], "fallbacks": sum(r.fallback for r in trace), **(extra or {})}
                        rows.append(row)
                        print(json.dumps({k: row[k] for k in ("dim", "setting", "base", "variant", "nfe", "model_evals", "sw2", "var_ratio")}), flush=True)
                        return row

                    record("plain", base, nfe)
                    evals_seen = set()
                    for vname, kw in VARIANTS.items():
                        r = record(vname, SteinDiff(base, **kw), nfe)
                        evals_seen.add(int(round(r["model_evals"])))
                    for ev in sorted(evals_seen):
                        record(f"plain@{ev}evals", base, ev, {"equal_evals_for": ev})
                    for k in (1, 2):
                        record(f"ode-oracle-first{k}", OracleGamma(base, gmm, k), nfe)
                    if dim == 2 and nfe <= 10:
                        record("ode-oracle-all", OracleGamma(base, gmm, 10**6), nfe)
    payload = {"command": " ".join(sys.argv), "batch": args.batch, "versions": versions(),
               "variants": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in VARIANTS.items()}, "rows": rows}
    write("gmm", payload, gmm_markdown(rows, args), Path(args.out))


def gmm_markdown(rows, args) -> str:
    lines = [f"# SteinDiff GMM study\n\n`{' '.join(sys.argv)}` — batch {args.batch}, 8-mode circle GMM (radius 4, std 0.3), "
             "exact denoiser, SW2 vs 20k exact samples (lower is better); var = within-mode variance ratio (1 is right).\n"]
    for dim in (2, 16):
        for setting in SETTINGS:
            for base in BASES:
                sel = [r for r in rows if r["dim"] == dim and r["setting"] == setting and r["base"] == base]
                if not sel:
                    continue
                nfes = sorted({r["target_nfe"] for r in sel})
                lines.append(f"\n## d={dim}, {setting}, base {base}: SW2 (var ratio) at NFE\n")
                lines.append("| variant | " + " | ".join(str(n) for n in nfes) + " |")
                lines.append("|---" * (len(nfes) + 1) + "|")
                names = list(dict.fromkeys(r["variant"] for r in sel if not r["variant"].startswith("plain@")))
                for name in names:
                    cells = []
                    for n in nfes:
                        r = next((r for r in sel if r["variant"] == name and r["target_nfe"] == n), None)
                        cells.append("—" if r is None else f"{r['sw2']:.3g} ({r['var_ratio']:.2g})")
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
                cells = []
                for n in nfes:
                    eq = [r for r in sel if r["target_nfe"] == n and r["variant"].startswith("plain@")]
                    cells.append(", ".join(f"{r['steps']}:{r['sw2']:.3g}" for r in eq))
                lines.append("| plain at equal model_evals (steps:SW2) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- contractivity --------------------------------------------------------------------------------
def run_lipschitz(args) -> None:
    from contractivity import lipschitz_along_trajectory
    from diffsample.solvers.solver import Grid

    gmm = circle_gmm(2)
    ns = VE(sigma_min=0.002, sigma_max=80.0)
    den = gmm.denoiser(ns)
    rows = []
    for nfe in args.nfe:
        grid = Grid.from_t(ns, Karras()(ns, nfe), final_zero=True)
        x = torch.randn(args.batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.hypot(1, 80)
        steps = lipschitz_along_trajectory(DPMSolverPP(order=2), lambda x, t: den(x, t), x, grid, iters=20, directions=8)
        s = [st.summary() for st in steps]
        rows.append({"nfe": nfe, "steps": s, "max_p99": max(r["power_p99"] for r in s), "max": max(r["power_max"] for r in s),
                     "steps_p99_above_1": sum(r["power_p99"] > 1 for r in s),
                     "secant_vs_power_max_rel": max(abs(r["secant_max"] / r["power_max"] - 1) for r in s)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "steps"}), flush=True)
    md = ["# Contractivity diagnostic: ||J_T||_2 along DPM-Solver++(2M) trajectories\n",
          f"`{' '.join(sys.argv)}` — 2-D 8-mode GMM, EDM (VE 0.002–80, Karras rho 7), batch {args.batch}, "
          "power iteration (20 its) and secant (8 directions). Values of an earlier exact numpy computation in brackets.\n",
          "| NFE | p99 (max over steps) | max | steps with p99 > 1 | max rel. gap secant/power (batch max) |", "|---|---|---|---|---|"]
    ref = {6: (8.4, 20.2, "3/6"), 12: (6.0, 6.3, "5/12"), 25: (3.7, 4.7, "13/25"), 50: (2.3, 3.0, "24/50"), 100: (1.63, 1.98, "49/100")}
    for r in rows:
        rr = ref.get(r["nfe"], ("?", "?", "?"))
        md.append(f"| {r['nfe']} | {r['max_p99']:.2f} [{rr[0]}] | {r['max']:.2f} [{rr[1]}] | {r['steps_p99_above_1']}/{r['nfe']} [{rr[2]}] | {r['secant_vs_power_max_rel']:.3f} |")
    write("lipschitz", {"command": " ".join(sys.argv), "batch": args.batch, "versions": versions(), "rows": rows},
          "\n".join(md) + "\n", Path(args.out))


# ---- MNIST ----------------------------------------------------------------------------------------
MNIST_VARIANTS: dict[str, tuple[str, dict]] = {
    "plain-dpm": ("dpm", {}),
    "plain-unipc": ("unipc", {}),
}


def run_mnist(args) -> None:
    from diffsample.run.models import load_model
    from diffsample.samplers.seeds import seeded_noise
    from diffsample.testbed import mnist

    torch.set_num_threads(1)
    model = load_model("mnist")
    n = args.n
    labels = torch.arange(n) % 10
    cond = model.cond(labels)
    noise = seeded_noise(range(args.seed_offset, args.seed_offset + n), model.sample_shape)
    out = Path(args.out)
    path = out / "stein_mnist.json"
    payload = json.loads(path.read_text()) if path.exists() and args.append else {"rows": []}
    payload.update({"command": " ".join(sys.argv), "n": n, "versions": versions(),
                    "step_schedule": args.schedule, "note": f"labels i % 10, seeded_noise(range({args.seed_offset}, {args.seed_offset} + n)); FD vs 1,000 held-out digits"})
    rows = payload["rows"]
    sched = Karras() if args.schedule == "karras" else LambdaUniform()

    def run(name, solver, steps, base_name, kw):
        if any(r["variant"] == name and r["steps"] == steps for r in rows):
            return
        torch.manual_seed(11)
        xs, evals, wall, nfe, gam, fb = [], 0.0, 0.0, 0, [], 0
        for chunk in range(0, n, args.chunk):
            sl = slice(chunk, chunk + args.chunk)
            c = model.cond(labels[sl])
            with stein_trace() as trace:
                res = Sampler(solver, sched, steps)(model.denoiser, noise[sl], c)
            xs.append(res.x)
            evals += res.model_evals * res.x.shape[0]
            wall += res.wall_time_s
            nfe = res.nfe
            gam.append([float(r.gamma[0]) for r in trace if r.corrected])
            fb += sum(r.fallback for r in trace)
        x = torch.cat(xs)
        fd = mnist.mnist_fd(x.float().clamp(-1, 1))
        row = {"variant": name, "base": base_name, "options": {k: str(v) for k, v in kw.items()}, "steps": steps,
               "nfe": nfe, "model_evals": evals / n, "fd": fd, "wall_s": round(wall, 1), "gamma_chunk0": gam[0][:6],
               "fallbacks": fb}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write("mnist", payload, mnist_markdown(payload), out)

    from diffsample.solvers import SOLVERS

    variants = [v for v in args.variants.split(",") if v]
    for nfe in args.nfe:
        for v in variants:
            if v in SOLVERS:  # a registered solver with its registered defaults, e.g. stein-dpm
                solver = SOLVERS.create(v)
                base_name = "dpm" if isinstance(solver.base, DPMSolverPP) else "unipc"
                kw = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver) if f.name != "base"}
            else:
                base_name, kw = MNIST_VARIANTS[v] if v in MNIST_VARIANTS else (v.split(":", 1)[0], VARIANTS[v.split(":", 1)[1]])
                solver = BASES[base_name] if not kw else SteinDiff(BASES[base_name], **kw)
            run(v, solver, nfe, base_name, kw)
            if kw and args.equal_evals:
                ev = int(round(solver.model_evals(Sampler(solver, sched, nfe).grid(model.denoiser.noise_schedule))))
                run(f"plain-{base_name}", BASES[base_name], ev, base_name, {})


def mnist_markdown(payload) -> str:
    rows = payload["rows"]
    lines = [f"# SteinDiff on the bundled MNIST model\n\n`{payload['command']}` — N = {payload['n']} per cell, "
             f"{payload['step_schedule']} steps, {payload['note']}. Versions: {payload['versions']}.\n",
             "| variant | steps | nfe | model_evals | MNIST-FD | wall s | gammas (first steps) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["variant"], r["steps"])):
        lines.append(f"| {r['variant']} | {r['steps']} | {r['nfe']} | {r['model_evals']:.0f} | {r['fd']:.2f} | {r['wall_s']} | "
                     f"{', '.join(f'{g:.3g}' for g in r['gamma_chunk0'])} |")
    return "\n".join(lines) + "\n"


def run_merge(args) -> None:
    """Merge MNIST result files (``--merge a.json,b.json``: parallel runs) into stein_mnist.json / .md,
    with a comparison table: Stein vs plain at equal nfe and at equal model_evals."""
    payloads = [json.loads(Path(p).read_text()) for p in args.merge.split(",")]
    rows = [r for p in payloads for r in p["rows"]]
    payload = {"commands": [p["command"] for p in payloads], "n": payloads[0]["n"], "versions": payloads[0]["versions"],
               "step_schedule": payloads[0]["step_schedule"], "note": payloads[0]["note"], "rows": rows}
    fd = {(r["variant"], r["steps"]): r for r in rows}
    md = mnist_markdown({**payload, "command": " ; ".join(payload["commands"])})
    md += ("\n## Stein vs plain\n\nRatio = FD(Stein) / FD(plain); 'equal evals' gives the plain solver "
           "steps = the Stein run's model_evals.\n\n| solver | NFE | FD plain | FD Stein | ratio (equal nfe) | "
           "plain steps at equal evals | FD plain (equal evals) |\n|---|---|---|---|---|---|---|\n")
    for r in sorted(rows, key=lambda r: (r["variant"], r["steps"])):
        if not r["variant"].startswith(("stein", "dpm:", "unipc:")):
            continue
        plain = fd.get((f"plain-{r['base']}", r["steps"]))
        eq = fd.get((f"plain-{r['base']}", int(round(r["model_evals"]))))
        md += (f"| {r['variant']} | {r['nfe']} | {plain['fd']:.2f} | {r['fd']:.2f} | {r['fd'] / plain['fd']:.2f} | "
               if plain else f"| {r['variant']} | {r['nfe']} | — | {r['fd']:.2f} | — | ")
        md += f"{int(round(r['model_evals']))} | {eq['fd']:.2f} |\n" if eq else f"{int(round(r['model_evals']))} | — |\n"
    md += ("\nWall times were taken on 2 CPU cores shared with several other jobs (load ~8): they show the "
           "order of magnitude only; the cost to compare is model_evals.\n")
    write("mnist", payload, md, Path(args.out))


def run_summary(args) -> None:
    """Aggregate stein_gmm.json: geometric-mean SW2 ratio to the plain solver per variant."""
    rows = json.loads((Path(args.out) / "stein_gmm.json").read_text())["rows"]
    plain = {(r["dim"], r["setting"], r["base"], r["target_nfe"]): r["sw2"] for r in rows if r["variant"] == "plain"}
    evals = {(r["dim"], r["setting"], r["base"], r["target_nfe"], r["steps"]): r["sw2"]
             for r in rows if r["variant"].startswith("plain@")}
    agg: dict = {}
    for r in rows:
        v = r["variant"]
        if v == "plain" or v.startswith("plain@"):
            continue
        key = (r["dim"], r["setting"], r["base"], r["target_nfe"])
        lr = math.log(min(r["sw2"], 1e3) / plain[key])
        d = agg.setdefault(v, {"lo": [], "hi": [], "EDM-lo": [], "VP-lo": [], "evals": [], "wins": 0, "n": 0})
        band = "lo" if r["target_nfe"] <= 8 else "hi"
        d[band].append(lr)
        d[f"{r['setting']}-{band}"] = d.get(f"{r['setting']}-{band}", []) + [lr]
        ev = key + (int(round(r["model_evals"])),)
        if ev in evals:
            d["evals"].append(math.log(min(r["sw2"], 1e3) / evals[ev]))
        d["wins"] += r["sw2"] < plain[key]
        d["n"] += 1
    g = lambda v: f"{math.exp(sum(v) / len(v)):.3g}" if v else "—"  # noqa: E731
    lines = ["# SteinDiff GMM study: summary\n",
             "Geometric mean over d in {2, 16}, EDM and VP, bases DPM-Solver++(2M) and UniPC-bh2 of "
             "SW2(variant) / SW2(plain) (< 1 is better; diverged runs capped at SW2 = 1000). "
             "'equal evals' divides by the plain solver run with steps = the variant's model_evals.\n",
             "| variant | NFE 4-8 | NFE 10-20 | worst at NFE 10-20 | EDM, NFE 4-8 | VP, NFE 4-8 | vs plain at equal model_evals | wins / runs (equal NFE) |",
             "|---|---|---|---|---|---|---|---|"]
    for v, d in agg.items():
        worst = f"{math.exp(max(d['hi'])):.3g}" if d["hi"] else "—"
        lines.append(f"| {v} | {g(d['lo'])} | {g(d['hi'])} | {worst} | {g(d['EDM-lo'])} | {g(d['VP-lo'])} | {g(d['evals'])} | {d['wins']}/{d['n']} |")
    (Path(args.out) / "stein_gmm_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["gmm", "lipschitz", "mnist", "summary", "merge"])
    p.add_argument("--merge", default="")
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--variants", default="plain-dpm,dpm:trans-first1-edm-clip")
    p.add_argument("--schedule", default="karras", choices=["karras", "lambda_uniform"])
    p.add_argument("--equal-evals", action="store_true")
    p.add_argument("--append", action="store_true")
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.nfe is None:
        args.nfe = [6, 12, 25, 50, 100] if args.what == "lipschitz" else [4, 5, 6, 8, 10, 20]
    {"gmm": run_gmm, "lipschitz": run_lipschitz, "mnist": run_mnist, "summary": run_summary, "merge": run_merge}[args.what](args)


if __name__ == "__main__":
    main()
