"""``diffsample`` command line: ``generate``, ``sweep`` and ``list``."""

from __future__ import annotations

import click

from diffsample.cli.generate_cmd import generate_cmd
from diffsample.cli.sweep_cmd import sweep_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffsample")
def main() -> None:
    """Inference-time sampling and guidance for diffusion models.

    \b
    Examples:
      diffsample generate                                  # bundled MNIST model, 16 samples
      diffsample generate --solver unipc_bh2 --steps 10 --class 3 --cfg-scale 1.5
      diffsample generate --solver stein-dpm:eta=1 --guidance noisetilt:beta=0.25
      diffsample sweep --solver dpmpp_2m --solver unipc_bh2 --steps 5,10,20 --out sweeps/a
      diffsample list
    """


@main.command("list")
@click.argument("what", required=False, type=click.Choice(["solvers", "schedules", "guidance", "rewards"]))
def list_cmd(what: str | None) -> None:
    """Print the registered solvers, step schedules, guidance terms and rewards, one line each."""
    from diffsample.guidance import GUIDANCE, REWARDS
    from diffsample.solvers import SOLVERS, STEP_SCHEDULES

    sections = {"solvers": SOLVERS, "schedules": STEP_SCHEDULES, "guidance": GUIDANCE, "rewards": REWARDS}
    for name, registry in sections.items():
        if what not in (None, name):
            continue
        click.echo(f"{name}:")
        for key in registry.names():
            click.echo(f"  {key:<18s} {registry.summary(key)}")


main.add_command(generate_cmd)
main.add_command(sweep_cmd)

if __name__ == "__main__":
    main()
