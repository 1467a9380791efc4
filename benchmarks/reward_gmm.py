"""NoiseTilt vs DPS on the exactly tilted high-dimensional Gaussian mixture
(docs/methods/gaussian_mixture.md; the same model as tests/guidance/reward_gmm.py).

A 2-D three-component mixture embedded by a random orthonormal U in R^1024 (isotropic std 0.5),
linear reward r(x) = a^T x with a = U (1, 0.5), temperature lam = 0.7: the exactly tilted target
p0 exp(r / lam) is a mixture with known proportions pi* and mean reward. 512 samples, DDPM
(euler_ancestral, linspace) with the exact denoiser, three seeds. Reported per method: mean
reward, component proportions (argmax responsibility under the target's components), the max
proportion error, and the off-manifold excess: mean over the trajectory of the exact
-log p_t(x_t) of the *unguided* marginal, minus the unguided run's (same noise).

    OMP_NUM_THREADS=1 python benchmarks/reward_gmm.py
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests" / "guidance"))

from reward_gmm import NS, OffManifold, Setup  # noqa: E402

from diffsample.guidance import DPS, NoiseTilt  # noqa: E402
from diffsample.samplers.sampler import Sampler  # noqa: E402
from diffsample.solvers import SOLVERS, STEP_SCHEDULES  # noqa: E402

N, DIM, STEPS, SEEDS = 512, 1024, 60, (1, 2, 3)


def main() -> None:
    torch.set_num_threads(1)
    s = Setup(DIM)
    den = s.gmm.denoiser(NS)
    smp = Sampler(SOLVERS.create("euler_ancestral"), STEP_SCHEDULES.create("linspace"), STEPS)
    methods = {"base": den, "noisetilt beta-matched (beta = lam)": NoiseTilt(s.reward, beta=s.lam)(den),
               "noisetilt constant rho = 0.001": NoiseTilt(s.reward, rho="constant", strength=0.001)(den)}
    for scale in (0.8, 1.0, 1.2, 1.0 / s.lam):
        methods[f"dps scale {scale:.3g}"] = DPS(s.reward, scale=scale)(den)
    rows = []
    for seed in SEEDS:
        base_off = None
        for name, guided in methods.items():
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(N, DIM, generator=g, dtype=torch.float64)
            gz = torch.Generator().manual_seed(seed + 10_000)
            om = OffManifold(s.gmm)
            t0 = time.perf_counter()
            res = smp(guided, noise, None, noise_fn=lambda a, b: torch.randn(N, DIM, generator=gz, dtype=torch.float64),
                      callback=om)
            prop = s.proportions(res.x)
            base_off = om.index if name == "base" else base_off
            row = {"seed": seed, "method": name, "reward": round(float(s.reward(res.x).mean()), 4),
                   "proportions": [round(v, 4) for v in prop.tolist()],
                   "max_prop_error": round(float((prop - s.pi_star).abs().max()), 4),
                   "off_manifold_excess": round(om.index - base_off, 4), "model_evals": res.model_evals,
                   "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv), "pi_star": [round(v, 4) for v in s.pi_star.tolist()],
              "reward_star": round(s.reward_star, 4), "n": N, "dim": DIM, "steps": STEPS, "rows": rows,
              "platform": platform.platform(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = ROOT / "results" / "reward_gmm"
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# NoiseTilt vs DPS on the exactly tilted 1024-D mixture", "",
             f"`{record['command']}` — {record['date']}; target pi* = {record['pi_star']}, "
             f"target mean reward {record['reward_star']}; {N} samples, {STEPS} DDPM steps, exact denoiser.", "",
             "| method | reward (mean ± sd over seeds) | max proportion error | off-manifold excess (nats) |", "|---|---|---|---|"]
    for name in methods:
        rs = [r for r in rows if r["method"] == name]

        def ms(key):
            v = torch.tensor([r[key] for r in rs], dtype=torch.float64)
            return f"{float(v.mean()):.3f} ± {float(v.std()):.3f}"

        lines.append(f"| {name} | {ms('reward')} | {ms('max_prop_error')} | {ms('off_manifold_excess')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
