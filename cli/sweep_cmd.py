"""``diffsample sweep``: FD/NFE grids with resume, tables, plots, an X/Y image grid and a report.

``--out`` is checked before anything runs (as ``generate``'s: not under a file, writable, no
non-file under the names the sweep writes), and every other argument too: bad input writes
nothing. ``results.jsonl`` is appended cell by cell (resume); ``results.md``, ``fd_vs_nfe.png``,
``xy_grid.png`` and ``report.html`` are rewritten atomically over every row in the folder after
the sweep, also when it stops on an error or Ctrl-C (the finished cells are kept, and
``results.md`` says to re-run the same command to resume).

Several processes: ``torchrun --nproc_per_node=K -m diffsample.cli.main sweep ...`` (or
``accelerate launch --multi_gpu -m diffsample.cli.main sweep ...``) deals each cell's batches to the ranks; rank
0 gathers, scores and writes (see :mod:`diffsample.run.sweep`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from diffsample.cli.options import FiniteFloat, int_list, registry_spec
from diffsample.testbed import DEFAULT_METRIC, METRICS


def _init_distributed() -> bool:
    """Join the process group a launcher (torchrun, accelerate) describes in the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with the gloo backend: the sweep
    runs its model on the CPU and exchanges only pickled samples. Returns whether this call
    initialised it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _read_prompts(prompt, prompts_file) -> list[str] | None:
    prompts = list(prompt)
    if prompts_file is not None:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {prompts_file}: {exc}", param_hint="--prompts-file")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not lines:
            raise click.BadParameter(f"{prompts_file} holds no prompt (one a line)", param_hint="--prompts-file")
        prompts += lines
    return prompts or None


@click.command("sweep")
@click.option("--model", default="mnist", show_default=True, metavar="PATH_OR_ID")
@click.option("--solver", "solvers", multiple=True, default=("dpmpp_2m", "unipc_bh2"), show_default=True,
              callback=registry_spec("solvers"), help="Solver spec (repeatable).")
@click.option("--schedule", "schedules", multiple=True, default=("karras",), show_default=True,
              callback=registry_spec("schedules"), help="Step schedule spec (repeatable).")
@click.option("--steps", "steps", default="5,10,20", show_default=True, callback=int_list,
              help="Comma-separated step counts.")
@click.option("--guidance", "guidance", multiple=True, callback=registry_spec("guidance"),
              help="Guidance setting (repeatable; each is one grid axis value; '+' composes terms).")
@click.option("--cfg-scale", type=FiniteFloat(min=0), default=None)
@click.option("--prompt", "prompt", multiple=True,
              help="Prompt for a text-to-image pipeline folder (repeatable; each prompt gets the same seeds).")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File of prompts, one a line ('#' lines skipped); added to --prompt.")
@click.option("--num-samples", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per cell (per prompt for a pipeline folder).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--metric", default=DEFAULT_METRIC, show_default=True,
              help="Score each cell: " + "; ".join(f"{name}: {m.summary}" for name, m in METRICS.items())
                   + "; reward:SPEC: mean of a reward (diffsample list rewards); clip-score: CLIP score of each "
                     "image against its prompt with --clip-weights; fid: FID in Inception-v3 features with "
                     "--fid-weights against --fid-reference; none: no score (tables show wall time).")
@click.option("--clip-weights", type=click.Path(path_type=Path), default=None,
              help="Local CLIP model folder (transformers CLIPModel, safetensors) for --metric clip-score; "
                   "nothing is downloaded.")
@click.option("--fid-weights", type=click.Path(path_type=Path), default=None,
              help="Local safetensors file of the FID Inception-v3 (pytorch-fid's 2015-12-05 weights, converted "
                   "once; see docs/sweeps.md) for --metric fid; nothing is downloaded.")
@click.option("--fid-reference", type=click.Path(path_type=Path), default=None,
              help="Folder of reference images for --metric fid (default for the bundled model: its 1,000 "
                   "held-out digits).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for results.jsonl (appended; re-running resumes), results.md, fd_vs_nfe.png, "
                   "xy_grid.png, report.html (all over every cell in the folder) and cells/.")
@click.option("-q", "--quiet", is_flag=True)
def sweep_cmd(model, solvers, schedules, steps, guidance, cfg_scale, prompt, prompts_file, num_samples, seed,
              batch_size, metric, clip_weights, fid_weights, fid_reference, out, quiet):
    """Run a solver x schedule x steps (x guidance) grid; one JSON line per finished cell.

    Under torchrun / accelerate launch the seeds of each cell are sharded over the processes; the
    results are those of one process."""
    from diffsample.run.models import load_model
    from diffsample.run.publish import check_out, recover
    from diffsample.run.sweep import RESULTS, SUMMARIES, markdown_table, run_sweep, write_summaries

    prompts = _read_prompts(prompt, prompts_file)
    started = _init_distributed()
    try:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            for name in SUMMARIES:
                for note in recover(out / name):
                    click.echo(note, err=True)
        check_out(out, "--out", outputs=(RESULTS, *SUMMARIES))
        settings = [tuple(g.split("+")) if g != "none" else () for g in guidance] or [()]
        loaded = load_model(model)
        finished = False
        try:
            rows = run_sweep(loaded, out, solvers=solvers, schedules=schedules, steps=steps, guidance=settings,
                             cfg_scale=cfg_scale, num_samples=num_samples, seed=seed, batch_size=batch_size,
                             metric=metric, prompts=prompts,
                             clip_weights=None if clip_weights is None else str(clip_weights),
                             fid_weights=None if fid_weights is None else str(fid_weights),
                             fid_reference=None if fid_reference is None else str(fid_reference),
                             log=(lambda s: None) if quiet or rank else click.echo,
                             warn=lambda s: click.echo(f"warning: {s}", err=True))
            finished = True
        finally:
            # Every cell in the folder (earlier invocations included) is summarised, also when a
            # cell failed or the sweep was interrupted; a failure here never hides the sweep's own error.
            if rank == 0 and (out / RESULTS).is_file():
                try:
                    write_summaries(out, interrupted=not finished)
                except Exception as exc:
                    if finished:
                        raise
                    click.echo(f"warning: could not rewrite {out / 'results.md'}: {exc}", err=True)
        if not quiet and rank == 0:
            click.echo(markdown_table(rows))
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
