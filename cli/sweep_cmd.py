"""``diffsample sweep``: FD/NFE grids with resume, a markdown table and a log-log plot.

``--out`` is checked before anything runs (as ``generate``'s: not under a file, writable, no
non-file under the names the sweep writes). ``results.jsonl`` is appended cell by cell (resume);
``results.md`` and ``fd_vs_nfe.png`` are rewritten atomically over every row in the folder after
the sweep, also when it stops on an error (the finished cells are kept)."""

from __future__ import annotations

from pathlib import Path

import click

from diffsample.cli.options import FiniteFloat, int_list, registry_spec
from diffsample.testbed import DEFAULT_METRIC, METRICS


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
@click.option("--num-samples", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--metric", type=click.Choice([*METRICS, "none"]), default=DEFAULT_METRIC, show_default=True,
              help="Score each cell with a bundled testbed's metric (" +
                   "; ".join(f"{name}: {m.summary}" for name, m in METRICS.items()) + "), or not at all.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for results.jsonl (appended; re-running resumes), results.md and fd_vs_nfe.png "
                   "(both over every cell in the folder).")
@click.option("-q", "--quiet", is_flag=True)
def sweep_cmd(model, solvers, schedules, steps, guidance, cfg_scale, num_samples, seed, batch_size, metric, out, quiet):
    """Run a solver x schedule x steps (x guidance) grid; one JSON line per finished cell."""
    from diffsample.run.models import load_model
    from diffsample.run.publish import check_out, recover
    from diffsample.run.sweep import RESULTS, SUMMARIES, markdown_table, run_sweep, write_summaries

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
                         metric=metric, log=(lambda s: None) if quiet else click.echo,
                         warn=lambda s: click.echo(f"warning: {s}", err=True))
        finished = True
    finally:
        # The table and plot cover every cell in the folder (earlier invocations included), and are
        # rewritten also when a cell failed; a failure here never hides the sweep's own error.
        if (out / RESULTS).is_file():
            try:
                write_summaries(out)
            except Exception as exc:
                if finished:
                    raise
                click.echo(f"warning: could not rewrite {out / 'results.md'}: {exc}", err=True)
    if not quiet:
        click.echo(markdown_table(rows))
