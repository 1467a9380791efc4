"""FID/NFE sweep engine: a grid of solvers x step schedules x steps (x guidance) on one model.

Each finished cell is appended as one JSON line to ``results.jsonl`` (flushed and fsynced), so an
interrupted sweep resumes where it stopped: cells already in the file are skipped, a cell cut off
mid-way is simply run again; none is lost or done twice.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffsample.run.generate import build_guided, build_sampler, generate
from diffsample.run.models import LoadedModel

METRICS = ("mnist-fd", "none")
RESULTS = "results.jsonl"


def cell_key(row: dict[str, Any]) -> tuple:
    """What identifies a cell: model, solver, schedule, steps, guidance, N, seed."""
    return (row["model"], row["solver"], row["schedule"], int(row["steps"]), tuple(row["guidance"]),
            row.get("cfg_scale"), int(row["num_samples"]), int(row["seed"]))


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    """Rows already in ``out_dir/results.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(out_dir) / RESULTS
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _score(metric: str, samples, classes) -> dict[str, float]:
    if metric == "none":
        return {}
    from diffsample.testbed import mnist

    x = samples.clamp(-1, 1)
    out = {"mnist_fd": mnist.mnist_fd(x)}
    if classes is not None:
        import torch

        out["class_accuracy"] = mnist.class_accuracy(x, torch.as_tensor(classes))
    return out


def run_sweep(model: LoadedModel, out_dir: str | os.PathLike, *, solvers: Sequence[str], schedules: Sequence[str],
              steps: Sequence[int], guidance: Sequence[Sequence[str]] = ((),), cfg_scale: float | None = None,
              num_samples: int = 1000, seed: int = 0, batch_size: int = 250, metric: str = "mnist-fd",
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out_dir/results.jsonl``; return all rows of this grid.

    Raises:
        ValueError: unknown solver / schedule / guidance / metric, or bad counts — all checked
            before the first cell runs.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if metric == "mnist-fd" and model.name != "mnist":
        raise ValueError("metric 'mnist-fd' needs the bundled MNIST model; use --metric none for other models "
                         "(Inception FID weights cannot be downloaded here)")
    cells = list(itertools.product(solvers, schedules, steps, [tuple(g) for g in guidance]))
    for solver, schedule, n, terms in cells:  # validate everything first
        build_guided(model, terms, cfg_scale, build_sampler(solver, schedule, n))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {cell_key(r): r for r in read_results(out_dir)}
    rows = []
    path = out_dir / RESULTS
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a") as fh:  # a crash left a torn last line: start the next row on a fresh line
            fh.write("\n")
    with open(path, "a") as fh:
        for solver, schedule, n, terms in cells:
            key_row = {"model": model.name, "solver": solver, "schedule": schedule, "steps": n,
                       "guidance": list(terms), "cfg_scale": cfg_scale, "num_samples": num_samples, "seed": seed}
            if cell_key(key_row) in done:
                rows.append(done[cell_key(key_row)])
                continue
            result = generate(model, solver=solver, schedule=schedule, steps=n, guidance=terms, cfg_scale=cfg_scale,
                              seed=seed, num_samples=num_samples, batch_size=batch_size)
            rec = result.record
            row = {**key_row, "nfe": rec["nfe"], "model_evals": rec["model_evals"],
                   "wall_time_s": rec["wall_time_s"], **_score(metric, result.samples, rec["classes"]),
                   "versions": rec["versions"], "date": rec["date"]}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[cell_key(row)] = row
            rows.append(row)
            log(f"{solver:>14s} {schedule:>14s} steps={n:<4d} nfe={row['nfe']:<4d} "
                + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k in ("mnist_fd", "class_accuracy")))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows = solver / schedule / guidance, columns = NFE; cells = MNIST-FD (or wall time)."""
    value = "mnist_fd" if rows and "mnist_fd" in rows[0] else "wall_time_s"
    nfes = sorted({r["nfe"] for r in rows})
    groups: dict[str, dict[int, float]] = {}
    for r in rows:
        label = f"{r['solver']} / {r['schedule']}" + (f" / {'+'.join(r['guidance'])}" if r["guidance"] else "")
        groups.setdefault(label, {})[r["nfe"]] = r[value]
    lines = [f"| {value} (N={rows[0]['num_samples'] if rows else 0}) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for label, vals in groups.items():
        lines.append(f"| {label} | " + " | ".join(f"{vals[n]:.2f}" if n in vals else "" for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """FD (or wall time) vs NFE, log-log, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value = "mnist_fd" if rows and "mnist_fd" in rows[0] else "wall_time_s"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        label = f"{r['solver']} / {r['schedule']}" + (f" / {'+'.join(r['guidance'])}" if r["guidance"] else "")
        groups.setdefault(label, []).append((r["nfe"], r[value]))
    for label, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(value.replace("_", "-"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
