"""Jeffrey marginal guidance vs classifier guidance vs CFG on the bundled MNIST model (issue 6).

For each target class marginal p*(y) the script samples N images with

* ``jeffrey``: Jeffrey guidance (noise-aware classifier, exact correction, scale 1) on the
  unconditional branch; p_theta(y) is estimated once from unguided samples of the same sampler
  (soft labels of the noise-aware classifier at t = 0; cached in ``benchmarks/cache/``);
* ``jeffrey_cond``: the variant for class-conditional models, ``denoised = sum_y q_t(y|x_t)
  D(x_t, t, y)`` with ``q_t ∝ p_t(y|x_t) p*(y) / p(y)`` from the noise-aware classifier, ``p(y)`` the
  classifier's own prior (its mean output on pure noise at t_max); classes with q <= 1e-3 pruned;
* ``jeffrey_cond_recal``: one recalibration round of ``jeffrey_cond`` (``w <- w p* / p_guided``, with
  ``p_guided`` the soft labels of the *noise-aware* classifier at t = 0 on the ``jeffrey_cond``
  samples, never the judge), fresh seeds;
* ``cg``: plain classifier guidance (noise-aware classifier, scale 1) on the unconditional branch,
  labels drawn in the exact target proportions;
* ``cond``: the class-conditional model (CFG scale 1 = unguided class-conditional sampling),
  labels in the exact target proportions; this is also the per-class FD reference;

and measures, with the *held-out* clean classifier (never used for guidance), the achieved class
marginal (argmax histogram) and its total-variation distance to p*, and the MNIST-FD per class
(samples the judge assigns to class y vs the 100 held-out digits of class y, at matched counts).

The target ``uniform_from_skewed`` guides a model whose own marginal is skewed: the base is the
``skewed10`` Jeffrey-guided model, whose marginal is estimated from its own samples.

    OMP_NUM_THREADS=1 python benchmarks/guidance_mnist.py            # everything, sequentially
    python benchmarks/guidance_mnist.py --methods jeffrey --no-report  # parts (benchmarks/cache/)
    python benchmarks/guidance_mnist.py --report-only                  # merge parts -> results/
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from diffsample.guidance import ClassifierGuidance, Cond, JeffreyGuidance, estimate_marginal, load_marginal, save_marginal
from diffsample.guidance.jeffrey.class_marginal import classifier_prior, parse_target, total_variation
from diffsample.guidance import TDS
from diffsample.samplers import Sampler, seeded_run
from diffsample.run.models import load_model
from diffsample.solvers import SOLVERS, STEP_SCHEDULES
from diffsample.testbed import mnist

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "guidance_mnist"
RESULTS = ROOT / "results"

TARGETS = {
    "uniform_01": "0:0.5,1:0.5",
    "3v8_70_30": "3:0.7,8:0.3",
    "skewed10": "0:0.25,1:0.18,2:0.13,3:0.10,4:0.08,5:0.07,6:0.06,7:0.05,8:0.045,9:0.035",
    "uniform_from_skewed": ",".join(f"{k}:0.1" for k in range(10)),
}
METHODS = ("jeffrey", "jeffrey_sde", "jeffrey_tds", "jeffrey_cond", "jeffrey_cond_recal", "cg", "cond")
SEED_BASE = {"jeffrey": 0, "jeffrey_sde": 0, "jeffrey_tds": 0, "marginal_sde": 600_000, "jeffrey_cond": 0, "jeffrey_cond_recal": 500_000, "cg": 100_000, "cond": 200_000, "marginal": 300_000, "marginal_skew": 400_000}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def label_counts(p: torch.Tensor, n: int) -> torch.Tensor:
    """Largest-remainder rounding of ``n p`` to integers summing to ``n``."""
    raw = p * n
    counts = raw.floor().long()
    rest = n - int(counts.sum())
    counts[torch.argsort(raw - counts, descending=True)[:rest]] += 1
    return counts


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = load_model()
        self.sampler = Sampler(SOLVERS.create(args.solver), STEP_SCHEDULES.create(args.schedule), args.steps)
        self.sde_sampler = Sampler(SOLVERS.create(args.sde_solver), STEP_SCHEDULES.create(args.schedule), args.steps)
        self.noisy = self.model.resources.classifier
        self.judge = mnist.load_classifier()
        self.ref_x, self.ref_y = mnist.load_digits("heldout")
        self.shape = self.model.sample_shape

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self, denoiser, labels: torch.Tensor | None, seed0: int, n: int = 0,
               sampler: Sampler | None = None) -> tuple[torch.Tensor, dict]:
        """``labels=None``: ``n`` samples with the null label in both branches (unconditional model;
        terms with base 'unconditional' use the negative branch anyway)."""
        if labels is None:
            labels = torch.full((n,), mnist.NULL_CLASS, dtype=torch.long)
        xs, evals, wall = [], 0.0, 0.0
        bs = self.args.batch
        for start in range(0, len(labels), bs):
            lab = labels[start:start + bs]
            cond = Cond({"class_labels": lab}, {"class_labels": torch.full_like(lab, mnist.NULL_CLASS)})
            seeds = range(seed0 + start, seed0 + start + len(lab))
            res = (sampler or self.sampler)(denoiser, cond=cond, **seeded_run(seeds, self.shape))
            xs.append(res.x.clamp(-1, 1))
            evals += res.model_evals * len(lab)
            wall += res.wall_time_s
        return torch.cat(xs), {"model_evals_per_sample": evals / len(labels), "wall_s": round(wall, 1)}

    def classify_t0(self, x: torch.Tensor) -> torch.Tensor:
        return self.noisy(x, torch.zeros(x.shape[0]))

    def model_marginal(self, key: str, denoiser, n: int, seed0: int, sampler: Sampler | None = None):
        cache = CACHE / "marginals.json"
        solver = self.args.solver if sampler is None else self.args.sde_solver
        tag = f"{key}|{solver}|{self.args.schedule}|{self.args.steps}|n={n}"
        est = load_marginal(cache, tag) if cache.is_file() else None
        if est is None:
            log(f"estimating model marginal {key} from {n} samples")
            x, _ = self.sample(denoiser, None, seed0, n, sampler=sampler)
            est = estimate_marginal(x, self.classify_t0, kind="soft")
            CACHE.mkdir(parents=True, exist_ok=True)
            save_marginal(cache, tag, est)
        return est, tag

    # ---- metrics ----------------------------------------------------------------------------------
    def judge_labels(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.judge(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])

    def metrics(self, x: torch.Tensor, p_star: torch.Tensor) -> dict:
        y = self.judge_labels(x)
        achieved = torch.bincount(y, minlength=10).double() / len(y)
        return {"achieved": [round(v, 4) for v in achieved.tolist()], "tv": round(total_variation(achieved, p_star), 4),
                "judge_labels": y.tolist()}


def jeffrey_base(bench: Bench, target: str, sampler: Sampler | None = None):
    """(denoiser used as 'the model', its marginal estimate, cache tag) for ``target`` (marginals
    under ``sampler``, default the deterministic benchmark sampler)."""
    uncond = bench.model.denoiser
    seed = SEED_BASE["marginal"] if sampler is None else SEED_BASE["marginal_sde"]
    est, tag = bench.model_marginal("unconditional", uncond, bench.args.n_marginal, seed, sampler)
    if target != "uniform_from_skewed":
        return uncond, est, tag
    # a model whose own marginal is skewed: the unconditional model tilted towards skewed10 (score
    # variant at scale 2, a tempered and deliberately inexact tilt; its marginal is then measured)
    skew = JeffreyGuidance(parse_target(TARGETS["skewed10"], 10), est.probs, classifier=bench.noisy, scale=2.0)(uncond)
    est2, tag2 = bench.model_marginal("jeffrey-skewed10-base", skew, bench.args.n_marginal_skew,
                                      SEED_BASE["marginal_skew"], sampler)
    return skew, est2, tag2


def run_part(bench: Bench, target: str, method: str) -> dict:
    args = bench.args
    p_star = parse_target(TARGETS[target], 10)
    base, est, tag = jeffrey_base(bench, target) if (method == "jeffrey" or target == "uniform_from_skewed"
                                                     and method == "cg") \
        else (bench.model.denoiser, None, None)
    counts = label_counts(p_star, args.n)
    labels = torch.repeat_interleave(torch.arange(10), counts)
    t0 = time.perf_counter()
    if method in ("jeffrey_sde", "jeffrey_tds"):
        base, est, tag = jeffrey_base(bench, target, bench.sde_sampler)
        tds = TDS(particles=args.particles) if method == "jeffrey_tds" else None
        den = JeffreyGuidance(p_star, est.probs, classifier=bench.noisy, tds=tds)(base)
        x, info = bench.sample(den, None, SEED_BASE[method], args.n, sampler=bench.sde_sampler)
        info["model_marginal"] = {"probs": [round(v, 4) for v in est.probs.tolist()], "n": est.n, "cache_key": tag}
        info["sampler"] = f"{args.sde_solver}/{args.schedule}/{args.steps}" + (f", {tds}" if tds else "")
    elif method == "jeffrey":
        den = JeffreyGuidance(p_star, est.probs, classifier=bench.noisy)(base)
        x, info = bench.sample(den, None, SEED_BASE["jeffrey"], args.n)
        info["model_marginal"] = {"probs": [round(v, 4) for v in est.probs.tolist()], "n": est.n, "cache_key": tag}
    elif method in ("jeffrey_cond", "jeffrey_cond_recal"):
        ns = bench.model.denoiser.noise_schedule
        g = torch.Generator().manual_seed(SEED_BASE["marginal"])
        prior = classifier_prior(bench.noisy, torch.randn(2000, *bench.shape, generator=g), ns.t_max)
        term = JeffreyGuidance(p_star, prior.probs, classifier=bench.noisy, variant="conditional", prune=1e-3)
        info_extra = {}
        if method == "jeffrey_cond_recal":
            first = torch.load(CACHE / f"{target}.jeffrey_cond.pt")
            p_guided = estimate_marginal(first, bench.classify_t0, kind="soft").probs
            term = term.recalibrated(p_guided)
            info_extra = {"recalibrated_from": [round(v, 4) for v in p_guided.tolist()]}
        x, info = bench.sample(term(bench.model.denoiser), None, SEED_BASE[method], args.n)
        info.update(info_extra)
        info["model_marginal"] = {"probs": [round(v, 4) for v in term.model_marginal.tolist()], "n": prior.n,
                                  "cache_key": "classifier prior at t_max" + (" (recalibrated)" if info_extra else "")}
    elif method == "cg":
        den = ClassifierGuidance(bench.noisy, scale=1.0)(base)
        x, info = bench.sample(den, labels, SEED_BASE["cg"])
    else:
        x, info = bench.sample(bench.model.denoiser, labels, SEED_BASE["cond"])
    out = {"target": target, "method": method, "n": args.n, **info, **bench.metrics(x, p_star),
           "requested_labels": labels.tolist() if not method.startswith("jeffrey") else None,
           "elapsed_s": round(time.perf_counter() - t0, 1)}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(x, CACHE / f"{target}.{method}.pt")
    (CACHE / f"{target}.{method}.json").write_text(json.dumps(out))
    log(f"{target} {method}: TV {out['tv']:.4f}, achieved {out['achieved']} ({out['elapsed_s']}s)")
    return out


def tv_floor(p_star: torch.Tensor, n: int, reps: int = 4000) -> float:
    """Expected TV of the empirical marginal of n exact samples from p* (the sampling-noise floor)."""
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p_star.float().expand(reps, -1), n, replacement=True, generator=g)
    emp = torch.zeros(reps, 10, dtype=torch.float64).scatter_add_(1, draws, torch.ones(reps, n, dtype=torch.float64)) / n
    return float(0.5 * (emp - p_star).abs().sum(1).mean())


def class_fd(bench: Bench, x: torch.Tensor, y: torch.Tensor, ref_x: torch.Tensor, ref_y: torch.Tensor, k: int, n: int):
    xa, xr = x[y == k][:n], ref_x[ref_y == k][:n]
    if len(xa) < n or len(xr) < n or n < 2:
        return None
    real = bench.ref_x[bench.ref_y == k]
    return mnist.mnist_fd(xa, real), mnist.mnist_fd(xr, real)


def report(bench: Bench | None, args: argparse.Namespace) -> None:
    parts = {}
    for f in sorted(CACHE.glob("*.json")):
        if f.name == "marginals.json":
            continue
        d = json.loads(f.read_text())
        parts[(d["target"], d["method"])] = d
    if bench is None:
        bench = Bench(args)
    summary = {}
    for target in TARGETS:
        if (target, "cond") not in parts:
            continue
        p_star = parse_target(TARGETS[target], 10)
        cond = parts[(target, "cond")]
        x_cond = torch.load(CACHE / f"{target}.cond.pt")
        y_cond_req = torch.tensor(cond["requested_labels"])
        entry = {"target": TARGETS[target], "tv_floor_exact_sampler": round(tv_floor(p_star, args.n), 4), "methods": {}}
        for method in METHODS:
            if (target, method) not in parts:
                continue
            d = parts[(target, method)]
            x = torch.load(CACHE / f"{target}.{method}.pt")
            y = torch.tensor(d["judge_labels"])
            fds = {}
            for k in (p_star > 0).nonzero().flatten().tolist():
                n_k = min(int((y == k).sum()), int((y_cond_req == k).sum()))
                if n_k < args.min_fd_count:
                    fds[k] = {"n": n_k, "fd": None, "fd_cond": None, "ratio": None}
                    continue
                fd, fd_ref = class_fd(bench, x, y, x_cond, y_cond_req, k, n_k)
                fds[k] = {"n": n_k, "fd": round(fd, 3), "fd_cond": round(fd_ref, 3), "ratio": round(fd / fd_ref, 3)}
            ratios = [v["ratio"] for v in fds.values() if v["ratio"] is not None]
            entry["methods"][method] = {k: d[k] for k in ("n", "tv", "achieved", "model_evals_per_sample", "wall_s")
                                        } | {"tv_to_cond_judged": round(total_variation(torch.tensor(d["achieved"]),
                                                                                        torch.tensor(cond["achieved"])), 4),
                                             "model_marginal": d.get("model_marginal"), "per_class_fd": fds,
                                             "max_fd_ratio": max(ratios) if ratios else None,
                                             "recalibrated_from": d.get("recalibrated_from")}
        summary[target] = entry
    meta = {
        "issue": 6,
        "command": args.commands or " ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
        "n_per_target": args.n, "n_marginal": args.n_marginal, "n_marginal_skew": args.n_marginal_skew, "solver": args.solver, "schedule": args.schedule,
        "steps": args.steps, "min_fd_count": args.min_fd_count,
        "judge": "held-out clean DigitClassifier (testbed/mnist/weights/classifier.safetensors); never used for guidance",
        "guidance_classifier": "NoisyDigitClassifier p(y | x_t, t); model marginals from its t=0 soft labels",
        "fd": "MNIST-FD per class: judge-assigned class-k samples vs the 100 held-out digits of class k; "
              "the reference 'fd_cond' uses the same number of class-conditional (CFG w=1) samples of class k",
        "targets_spec": {"tv": "<= 0.02", "fd_ratio": "<= 1.2 x unguided class-conditional"},
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "guidance_mnist.json").write_text(json.dumps({"meta": meta, "results": summary}, indent=1))
    (RESULTS / "guidance_mnist.md").write_text(markdown(meta, summary))
    log(f"wrote {RESULTS / 'guidance_mnist.json'} and .md")


def markdown(meta: dict, summary: dict) -> str:
    names = {"jeffrey": "Jeffrey, score variant (noise-aware clf gradient)",
             "jeffrey_sde": "Jeffrey, score variant, SDE sampler (1 chain)",
             "jeffrey_tds": "Jeffrey, score variant, SDE sampler + TDS (K particles)",
             "jeffrey_cond": "Jeffrey, conditional variant (sum_y q_t(y|x) D(x,t,y))",
             "jeffrey_cond_recal": "Jeffrey, conditional variant + 1 recalibration round", "cg": "classifier guidance, labels ~ p*", "cond": "class-conditional (CFG w=1), labels ~ p*"}
    out = ["# Jeffrey marginal guidance on the bundled MNIST model (issue 6)", "",
           f"Command: `{meta['command']}`", "",
           f"N = {meta['n_per_target']} samples per target and method; sampler {meta['solver']} / {meta['schedule']}, "
           f"{meta['steps']} steps; model marginal from {meta['n_marginal']} unguided samples. "
           "Achieved marginal and per-class FD measured with the held-out clean classifier (never used for guidance). "
           "TV floor = expected TV of N exact draws from p* (sampling noise alone). 'TV to class-cond. judged "
           "marginal' compares with what the judge reports for the class-conditional baseline (labels drawn exactly "
           "in proportion), i.e. it discounts the judge's disagreement with the model's own class-conditionals. Per-class FD ratio = FD of the "
           "method's class-k samples / FD of the same number of class-conditional samples of class k "
           f"(classes with fewer than {meta['min_fd_count']} samples skipped). Targets: TV <= 0.02, FD ratio <= 1.2.", ""]
    out += ["| target | TV floor (exact sampler) | method | TV to target | TV to class-cond. judged marginal | "
            "max per-class FD ratio | model evals / sample |",
            "|---|---|---|---|---|---|---|"]
    for target, e in summary.items():
        for m, r in e["methods"].items():
            out.append(f"| {target} `{e['target']}` | {e['tv_floor_exact_sampler']} | {names[m]} | {r['tv']} | "
                       f"{r['tv_to_cond_judged']} | {r['max_fd_ratio']} | {r['model_evals_per_sample']:.0f} |")
    out += ["", "## Achieved marginals and per-class FD", ""]
    for target, e in summary.items():
        out.append(f"### {target}: p* = {e['target']}")
        out.append("")
        for m, r in e["methods"].items():
            fd = ", ".join(f"{k}: {v['fd']} vs {v['fd_cond']} (n={v['n']})" for k, v in r["per_class_fd"].items())
            out.append(f"- {names[m]}: achieved {r['achieved']}; per-class FD {fd}")
            if r.get("model_marginal"):
                out.append(f"  - model marginal used: {r['model_marginal']['probs']} (n={r['model_marginal']['n']})")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-marginal", type=int, default=2000)
    ap.add_argument("--n-marginal-skew", type=int, default=1000, help="samples for the skewed base's marginal")
    ap.add_argument("--solver", default="dpmpp_2m")
    ap.add_argument("--schedule", default="karras")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--sde-solver", default="dpmpp_2m_sde", help="stochastic sampler of jeffrey_sde / jeffrey_tds")
    ap.add_argument("--particles", type=int, default=8, help="TDS particles per output (jeffrey_tds)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--min-fd-count", type=int, default=100)
    ap.add_argument("--parts", default=None, help="explicit TARGET:METHOD list (overrides --targets/--methods)")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--commands", default=None, help="commands to record in the results (when run in parts)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bench = Bench(args)
    if not args.report_only:
        pairs = ([tuple(p.split(":")) for p in args.parts.split(",")] if args.parts else
                 [(t, m) for t in args.targets.split(",") for m in args.methods.split(",")])
        for target, method in pairs:
            run_part(bench, target, method)
    if not args.no_report:
        report(bench, args)


if __name__ == "__main__":
    main()
