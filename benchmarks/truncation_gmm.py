"""Recursive retraining with truncated sampling on a 2-D Gaussian mixture, constant vs annealed stop
(arXiv 2606.13796; docs/methods/truncation.md).

Each generation i trains a small MLP eps-model (warm-started from generation i - 1) on the pool
q_i = alpha p_data + (1 - alpha) p_i (fresh data draws with probability alpha, else the previous
generation's samples; p_0 = p_data), then samples N points with DPM-Solver++(2M) SDE stopped at OU
time t0_i, returning x_t0 (``Sampler(stop=StopTime(t0_i, "ou_time"))``). Schedules: constant
t0_i = t0 and annealed t0_i = t0 / (1 + i)^beta. Generation 0 is shared (same model, same samples).

Per generation: the pooled Hermite ratios to the data (``hermite_spectrum``, 16 random directions,
degrees 0..8) against the closed-form prediction ``predicted_attenuation``; the one-step model
error eps_n = ratio_n(i) / (e^{-n t0_i/2} (alpha + (1 - alpha) ratio_n(i-1))) - 1 (the score-error
floor); W2 to the data by exact optimal transport between --w2-samples generated and data points
(scipy's assignment solver), next to the same estimator on exact samples of the ideal recursion
(closed form) and on two independent data sets (the estimator's finite-sample floor).

    OMP_NUM_THREADS=1 python benchmarks/truncation_gmm.py --out benchmarks/results

writes truncation_gmm.json, truncation_gmm.md and truncation_gmm.png into --out. --quick: a
smoke run (3 generations, small sizes); --replot: rebuild the md and png from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from torch import nn

from diffsample.samplers import Sampler
from diffsample.samplers.hermite import hermite_spectrum
from diffsample.solvers import SOLVERS, LambdaUniform, LinearVP
from diffsample.solvers.stop_time import StopTime
from diffsample.solvers.truncation import TruncationSchedule, attenuation, contraction_rate
from diffsample.testbed.gmm import GaussianMixture
from diffsample.testbed.truncation import recursion

DATA = GaussianMixture(torch.tensor([[-1.2, 0.3], [0.9, 0.8], [0.4, -1.1]]), torch.tensor([0.35, 0.5, 0.3]),
                       torch.tensor([0.5, 0.3, 0.2]))
NS = LinearVP()
N_MAX = 8


class EpsNet(nn.Module):
    """MLP eps-prediction network on (x, lambda) for the 2-D mixture."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 5, dtype=torch.float32))
        self.body = nn.Sequential(nn.Linear(2 + 9, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, lambda_: torch.Tensor) -> torch.Tensor:
        l = lambda_[:, None] / 5
        emb = torch.cat([l, torch.sin(2 * self.freqs * l), torch.cos(2 * self.freqs * l)], 1)
        return self.body(torch.cat([x, emb], 1))


class NetDenoiser:
    """``D = (x - sigma eps) / alpha`` of an :class:`EpsNet` (float32) as a diffsample Denoiser."""

    def __init__(self, net: EpsNet) -> None:
        self.net, self.noise_schedule = net, NS

    def __call__(self, x, t, cond=None):
        t = t.double()
        a, s = NS.alpha(t).float()[:, None], NS.sigma(t).float()[:, None]
        with torch.no_grad():
            eps = self.net(x.float(), NS.lambda_(t).float())
        return ((x.float() - s * eps) / a).to(x.dtype)


def train(net: EpsNet, pool: torch.Tensor | None, alpha: float, iters: int, gen: torch.Generator,
          batch: int = 1024, lr: float = 2e-3) -> float:
    """Denoising score matching (eps loss, lambda ~ U[-5, 5]) on alpha p_data + (1 - alpha) pool."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    losses = []
    for _ in range(iters):
        x0 = DATA.sample(batch, gen).float()
        if pool is not None:
            synthetic = torch.rand(batch, generator=gen) >= alpha
            idx = torch.randint(len(pool), (batch,), generator=gen)
            x0 = torch.where(synthetic[:, None], pool[idx], x0)
        lam = torch.rand(batch, generator=gen, dtype=torch.float64) * 10 - 5
        t = NS.t_from_lambda(lam).clamp(NS.t_min, NS.t_max)
        a, s = NS.alpha(t).float()[:, None], NS.sigma(t).float()[:, None]
        eps = torch.randn(batch, 2, generator=gen)
        loss = ((net(a * x0 + s * eps, NS.lambda_(t).float()) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses[-200:]))


def sample(net: EpsNet, n: int, t0: float, steps: int, seed: int) -> torch.Tensor:
    sampler = Sampler(SOLVERS.create("dpmpp_2m_sde"), LambdaUniform(), steps, stop=StopTime(t0, "ou_time"))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g)
    return sampler(NetDenoiser(net), noise, noise_fn=lambda a, b: torch.randn(n, 2, generator=g)).x.float()


def w2(x: np.ndarray, y: np.ndarray) -> float:
    """Exact W2 between two equal-size point sets (optimal assignment)."""
    c = cdist(x, y, "sqeuclidean")
    r, k = linear_sum_assignment(c)
    return float(np.sqrt(c[r, k].mean()))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    alpha, t0, G = args.alpha, args.t0, args.generations
    configs = {"constant": TruncationSchedule("constant", t0=t0)}
    for beta in args.betas:
        configs[f"beta={beta:g}"] = TruncationSchedule("power", t0=t0, beta=beta)
    ref = DATA.sample(args.ref_samples, torch.Generator().manual_seed(1))
    ref_spec = hermite_spectrum(ref, n_max=N_MAX, n_dirs=16, seed=0)
    w2_data = DATA.sample(args.w2_samples, torch.Generator().manual_seed(2)).numpy()
    w2_floor = w2(DATA.sample(args.w2_samples, torch.Generator().manual_seed(3)).numpy(), w2_data)
    degrees = np.arange(N_MAX + 1)
    rows, timing = [], {}

    def measure(name, sched, i, x, prev_ratio, loss, t_train, t_sample):
        spec = hermite_spectrum(x, ref=ref_spec, n_max=N_MAX, basis=ref_spec.directions)
        e = np.exp(-degrees * sched.t0_at(i) / 2)
        one_step = spec.ratio_n / (e * (alpha + (1 - alpha) * prev_ratio)) - 1
        laws = ideal[name]
        ideal_x = laws[i].sample(args.w2_samples, torch.Generator().manual_seed(100 + i)).numpy()
        row = {"config": name, "generation": i, "t0": sched.t0_at(i), "train_loss": loss,
               "ratio": spec.ratio_n.tolist(), "ratio_se": spec.ratio_n_se.tolist(),
               "predicted": sched.predicted_attenuation(i, degrees, alpha).tolist(),
               "one_step_error": one_step.tolist(), "energy": spec.energy.tolist(),
               "w2": w2(x[: args.w2_samples].numpy(), w2_data), "w2_ideal": w2(ideal_x, w2_data),
               "train_s": t_train, "sample_s": t_sample}
        rows.append(row)
        print(f"{name:>10} gen {i:2d} t0 {row['t0']:.4f} loss {loss:.4f} W2 {row['w2']:.3f} (ideal "
              f"{row['w2_ideal']:.3f}) ratio n=1..6 {np.round(spec.ratio_n[1:7], 3)} pred "
              f"{np.round(row['predicted'][1:7], 3)} [{t_train:.0f}+{t_sample:.0f} s]", flush=True)
        return spec.ratio_n

    ideal = {name: recursion(DATA, alpha, s.t0_at, G) for name, s in configs.items()}
    gen = torch.Generator().manual_seed(10)
    start = time.perf_counter()
    net0 = EpsNet(args.width)
    t = time.perf_counter()
    loss0 = train(net0, None, alpha, args.iters0, gen)
    t_train0 = time.perf_counter() - t
    t = time.perf_counter()
    x0 = sample(net0, args.samples, t0, args.steps, seed=1000)
    t_sample0 = time.perf_counter() - t
    timing["generation0_train_s"], timing["sample_s"] = t_train0, t_sample0
    for name, sched in configs.items():
        net = EpsNet(args.width)
        net.load_state_dict(net0.state_dict())
        x, prev = x0, measure(name, sched, 0, x0, np.ones(N_MAX + 1), loss0, t_train0, t_sample0)
        for i in range(1, G):
            t = time.perf_counter()
            loss = train(net, x, alpha, args.iters, gen)
            t_train = time.perf_counter() - t
            t = time.perf_counter()
            x = sample(net, args.samples, sched.t0_at(i), args.steps, seed=1000 + i)
            prev = measure(name, sched, i, x, prev, loss, t_train, time.perf_counter() - t)
    timing["total_s"] = time.perf_counter() - start
    return {"rows": rows, "w2_floor": w2_floor, "timing": timing,
            "A_n": attenuation(degrees, t0, alpha).tolist(), "kappa": contraction_rate(t0, alpha)}


def summarise(res: dict, args) -> dict:
    """Constant-t0 plateau vs A_n (with the score-error floor) and W2 at generation 10."""
    rows = res["rows"]
    G, alpha, t0 = args.generations, args.alpha, args.t0
    last = [r for r in rows if r["config"] == "constant" and r["generation"] >= G - args.plateau]
    ratio = np.array([r["ratio"] for r in last])
    se = np.array([r["ratio_se"] for r in last])
    pred = np.array([r["predicted"] for r in last])
    const = [r for r in rows if r["config"] == "constant" and r["generation"] >= 1]
    eps = np.array([r["one_step_error"] for r in const])
    eps_rms = np.sqrt(np.nanmean(eps**2, axis=0))
    n = np.arange(N_MAX + 1)
    e = np.exp(-n * t0 / 2)
    a_n = np.array(res["A_n"])
    plateau = {"degrees": n.tolist(), "measured": ratio.mean(0).tolist(),
               "se": (np.sqrt((se**2).mean(0) / len(last))).tolist(), "predicted": pred.mean(0).tolist(),
               "A_n": a_n.tolist(), "one_step_error_rms": eps_rms.tolist(),
               "floor": (a_n * eps_rms / (1 - (1 - alpha) * e)).tolist()}
    dev = np.abs(np.array(plateau["measured"]) - np.array(plateau["predicted"]))
    plateau["within_2se_plus_floor"] = (dev <= 2 * np.array(plateau["se"]) + np.array(plateau["floor"])).tolist()
    gen = min(10, G - 1)
    at = {r["config"]: r for r in rows if r["generation"] == gen}
    const_plateau_w2 = float(np.mean([r["w2"] for r in last]))
    const_plateau_ideal = float(np.mean([r["w2_ideal"] for r in last]))
    floor = res["w2_floor"]

    def excess(v):
        return math.sqrt(max(v**2 - floor**2, 0.0))

    def around(name):  # generations gen - 1 .. gen + 1: one W2 estimate is noisy
        return float(np.mean([r["w2"] for r in rows if r["config"] == name and abs(r["generation"] - gen) <= 1]))

    w2 = {name: {"w2": r["w2"], "w2_ideal": r["w2_ideal"], "plateau_over_w2": const_plateau_w2 / r["w2"],
                 "excess": excess(r["w2"]),
                 "plateau_over_w2_excess": excess(const_plateau_w2) / excess(r["w2"]) if r["w2"] > floor else None,
                 "ideal_plateau_over_w2": const_plateau_ideal / r["w2_ideal"],
                 "w2_around": around(name), "plateau_over_w2_around": const_plateau_w2 / around(name)}
          for name, r in at.items()}
    return {"plateau": plateau, "w2_generation": gen, "constant_plateau_w2": const_plateau_w2,
            "constant_plateau_w2_ideal": const_plateau_ideal, "w2_floor": floor, "w2": w2}


def markdown(res: dict, summary: dict, args, command: str) -> str:
    p = summary["plateau"]
    lines = [
        "# Recursive retraining with truncation on a 2-D Gaussian mixture (arXiv 2606.13796)", "",
        f"Command: `{command}`", "",
        f"alpha = {args.alpha}, t0 = {args.t0}, {args.generations} generations, {args.samples} samples per "
        f"generation, MLP width {args.width}, {args.iters0} training steps at generation 0 then {args.iters} "
        f"(warm start), DPM-Solver++(2M) SDE with {args.steps} lambda-uniform steps to the stop; kappa = "
        f"{res['kappa']:.4f}. Wall time {res['timing']['total_s'] / 60:.1f} min "
        f"({torch.get_num_threads()} thread(s)).", "",
        f"## Constant-t0 plateau (mean of generations {args.generations - args.plateau}..{args.generations - 1}) "
        "against the closed form", "",
        "| n | measured ratio | SE | predicted (recursion) | A_n | one-step model error (rms) | floor | "
        "within 2 SE + floor |", "|---|---|---|---|---|---|---|---|"]
    for k in range(1, 7):
        lines.append(f"| {k} | {p['measured'][k]:.4f} | {p['se'][k]:.4f} | {p['predicted'][k]:.4f} | {p['A_n'][k]:.4f} | "
                     f"{p['one_step_error_rms'][k]:.4f} | {p['floor'][k]:.4f} | {'yes' if p['within_2se_plus_floor'][k] else 'no'} |")
    lines += ["", "The floor is the plateau shift a per-generation relative model error of that size produces "
              "in the limit: A_n eps_n / (1 - (1 - alpha) e^{-n t0/2}).", "",
              f"## W2 to the data at generation {summary['w2_generation']}", "",
              f"Exact-OT W2 between {args.w2_samples} generated and {args.w2_samples} data points; two independent "
              f"data sets give {summary['w2_floor']:.3f} (the estimator's floor). Constant-t0 plateau: "
              f"{summary['constant_plateau_w2']:.3f} (ideal recursion, same estimator: "
              f"{summary['constant_plateau_w2_ideal']:.3f}). 'Excess' is sqrt(W2^2 - floor^2).", "",
              "| schedule | W2 | W2 ideal recursion | plateau / W2 | plateau / W2, excess | ideal plateau / ideal W2 | "
              "W2, mean of generations ±1 | plateau / that |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in summary["w2"].items():
        ex = "at the floor" if r["plateau_over_w2_excess"] is None else f"{r['plateau_over_w2_excess']:.2f}"
        lines.append(f"| {name} | {r['w2']:.3f} | {r['w2_ideal']:.3f} | {r['plateau_over_w2']:.2f} | {ex} | "
                     f"{r['ideal_plateau_over_w2']:.2f} | {r['w2_around']:.3f} | {r['plateau_over_w2_around']:.2f} |")
    lines += ["", "## Per generation", "", "| schedule | gen | t0 | W2 | W2 ideal | ratio n=2 (pred) | n=4 (pred) | n=6 (pred) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['generation']} | {r['t0']:.4f} | {r['w2']:.3f} | {r['w2_ideal']:.3f} | "
                     + " | ".join(f"{r['ratio'][k]:.3f}±{r['ratio_se'][k]:.3f} ({r['predicted'][k]:.3f})" for k in (2, 4, 6))
                     + " |")
    return "\n".join(lines) + "\n"


def figure(res: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    for c, name in enumerate(configs):
        rs = [r for r in rows if r["config"] == name]
        g = [r["generation"] for r in rs]
        ax[0].plot(g, [r["w2"] for r in rs], "o-", color=f"C{c}", label=f"{name} (learned)")
        ax[0].plot(g, [r["w2_ideal"] for r in rs], "--", color=f"C{c}", alpha=0.7)
    ax[0].axhline(res["w2_floor"], color="gray", lw=0.8, ls=":", label="data vs data (estimator floor)")
    ax[0].set(xlabel="generation", ylabel="W2 to the data", title="W2 (dashed: ideal recursion)")
    ax[0].legend(fontsize=7)
    const = [r for r in rows if r["config"] == "constant"]
    for k in range(1, 7):
        g = [r["generation"] for r in const]
        ax[1].errorbar(g, [r["ratio"][k] for r in const], yerr=[2 * r["ratio_se"][k] for r in const], fmt="o",
                       color=f"C{k}", ms=3, label=f"n={k}")
        ax[1].plot(g, [r["predicted"][k] for r in const], "-", color=f"C{k}", lw=1)
        ax[1].axhline(res["A_n"][k], color=f"C{k}", ls=":", lw=0.8)
    ax[1].set(xlabel="generation", ylabel="Hermite ratio to data", title=f"constant t0 = {args.t0}: ratio ±2 SE, "
              "prediction (line), A_n (dotted)")
    ax[1].legend(fontsize=7, ncol=2)
    gen = min(10, args.generations - 1)
    n = np.arange(1, N_MAX + 1)
    for c, name in enumerate(configs):
        r = next(r for r in rows if r["config"] == name and r["generation"] == gen)
        ax[2].errorbar(n, np.array(r["ratio"])[1:], yerr=2 * np.array(r["ratio_se"])[1:], fmt="o", color=f"C{c}",
                       ms=3, label=name)
        ax[2].plot(n, np.array(r["predicted"])[1:], "-", color=f"C{c}", lw=1)
    ax[2].set(xlabel="Hermite degree n", ylabel="ratio to data", title=f"spectrum at generation {gen} (line: closed form)")
    ax[2].legend(fontsize=7)
    fig.suptitle(f"Recursive retraining on a 2-D mixture, alpha = {args.alpha}, learned MLP score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--t0", type=float, default=0.3)
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--generations", type=int, default=12)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--ref-samples", type=int, default=200_000)
    p.add_argument("--w2-samples", type=int, default=3000)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--iters0", type=int, default=4000)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--plateau", type=int, default=5, help="last generations averaged for the constant plateau")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--replot", action="store_true", help="rebuild the md and png from --out's JSON, no sampling")
    args = p.parse_args()
    if args.replot:
        saved = json.loads((args.out / "truncation_gmm.json").read_text())
        for key, value in saved["meta"]["args"].items():
            if key not in ("out", "replot"):
                setattr(args, key, value)
        res = {k: saved[k] for k in ("rows", "w2_floor", "timing", "A_n", "kappa")}
        summary = summarise(res, args)
        saved["summary"] = summary
        (args.out / "truncation_gmm.json").write_text(json.dumps(saved, indent=1))
        md = markdown(res, summary, args, saved["meta"]["command"])
        (args.out / "truncation_gmm.md").write_text(md)
        figure(res, args, args.out / "truncation_gmm.png")
        print(md)
        return
    if args.quick:
        args.generations, args.samples, args.iters0, args.iters, args.steps = 3, 4000, 300, 100, 30
        args.ref_samples, args.w2_samples, args.plateau = 20_000, 500, 2
    command = "OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv)
    res = run(args)
    summary = summarise(res, args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "date": date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / "truncation_gmm.json").write_text(json.dumps({"meta": meta, "summary": summary, **res}, indent=1))
    md = markdown(res, summary, args, command)
    (args.out / "truncation_gmm.md").write_text(md)
    figure(res, args, args.out / "truncation_gmm.png")
    print(md)


if __name__ == "__main__":
    main()
