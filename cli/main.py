"""``diffsample`` command line: ``generate``, ``sweep`` and ``list`` (registries and bundled models).

Importing this module imports click and the command definitions only; registries, torch and the
samplers are imported when a command runs (``diffsample --help`` stays fast, and a misspelt name is
refused before any numerics load).
"""

from __future__ import annotations

import click

from diffsample.cli.errors import DiffsampleGroup
from diffsample.cli.generate_cmd import generate_cmd
from diffsample.cli.options import REGISTRIES, registry
from diffsample.cli.optimize_cmd import optimize_cmd
from diffsample.cli.spectrum_cmd import spectrum_cmd
from diffsample.cli.sweep_cmd import sweep_cmd
from diffsample.core.registry import did_you_mean

_KIND = {"solvers": "solver", "schedules": "step schedule", "guidance": "guidance term", "rewards": "reward"}


@click.group(cls=DiffsampleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffsample")
@click.option("--debug", is_flag=True, help="Print the traceback of an unexpected error (exit code 1).")
def main(debug: bool) -> None:
    """Inference-time sampling and guidance for diffusion models.

    Bad input ends with one line on stderr and exit code 2 (nothing written); an unexpected
    error with one line and exit code 1 (the traceback with --debug).

    \b
    Examples:
      diffsample generate                                  # bundled MNIST model, 16 samples
      diffsample generate --solver unipc_bh2 --steps 10 --class 3 --cfg-scale 1.5
      diffsample generate --solver stein_dpm:eta=1 --guidance noisetilt:beta=0.25
      diffsample sweep --solver dpmpp_2m --solver unipc_bh2 --steps 5,10,20 --out sweeps/a
      diffsample list
      diffsample list noisetilt
    """


@main.command("list")
@click.argument("what", required=False, metavar="[solvers|schedules|guidance|rewards|models|NAME]")
def list_cmd(what: str | None) -> None:
    """Print the registered solvers, step schedules, guidance terms and rewards, one line each
    (aliases say what they stand for); with NAME, that entry's summary, aliases and every option
    with its default and meaning. `list models` prints the bundled models with the solver,
    schedule and steps `generate` uses for each when none is given, and its CFG policy.

    \b
    Spec syntax: NAME[:key=value,...]; a value holding commas is bracketed:
      jeffrey:target=[0:0.5,1:0.5]   noisetilt:reward=(class_logp:label=3),beta=0.5
    """
    from diffsample.testbed import BUNDLED_INFO

    if what is None or what in REGISTRIES:
        for word in REGISTRIES:
            if what in (None, word):
                _print_registry(word)
        if what is None:
            _print_models(BUNDLED_INFO)
        return
    if what == "models":
        _print_models(BUNDLED_INFO)
        return
    if what in BUNDLED_INFO:
        _print_models({what: BUNDLED_INFO[what]}, cfg=True)
        return
    found = [(word, registry(word)) for word in REGISTRIES]
    found = [(word, reg) for word, reg in found if what in reg]
    if not found:
        words = [*REGISTRIES] + [n for word in REGISTRIES for n in _names_and_aliases(registry(word))] \
            + ["models", *BUNDLED_INFO]
        raise click.BadParameter(f"unknown name {what!r}; valid: {', '.join(words)}{did_you_mean(what, words)}",
                                 param_hint="NAME")
    for k, (word, reg) in enumerate(found):
        if k:
            click.echo()
        _print_entry(word, reg, what)


def _names_and_aliases(reg) -> list[str]:
    return [n for name in reg.names() for n in (name, *reg.aliases(name))]


def _print_registry(word: str) -> None:
    reg = registry(word)
    click.echo(f"{word}:")
    for name in reg.names():
        click.echo(f"  {name:<18s} {reg.summary(name)}")
        for alias in reg.aliases(name):
            click.echo(f"  {alias:<18s} alias of {name}")


def _print_models(models: dict, cfg: bool = False) -> None:
    """Bundled models: name, default ``solver / schedule / steps`` (what ``generate`` uses when none
    is given) and summary; with ``cfg``, the CFG policy too."""
    click.echo("models:")
    for name, info in models.items():
        click.echo(f"  {name:<18s} {info.solver} / {info.schedule} / {info.steps} step{'' if info.steps == 1 else 's'}; {info.summary}")
        if cfg:
            click.echo(f"  {'':<18s} CFG: {info.cfg}")


def _print_entry(word: str, reg, name: str) -> None:
    canonical = reg.canonical(name)
    title = f"{name} ({_KIND[word]}" + (f", alias of {canonical})" if canonical != name else ")")
    click.echo(f"{title}: {reg.summary(canonical)}")
    aliases = reg.aliases(canonical)
    click.echo(f"aliases: {', '.join(aliases) if aliases else '(none)'}")
    options = reg.options(canonical)
    if not options:
        click.echo("options: (none)")
        return
    click.echo("options:")
    width = max(len(str(o)) for o in options)
    for o in options:
        click.echo(f"  {str(o):<{width}s}  {o.meaning}")


main.add_command(generate_cmd)
main.add_command(sweep_cmd)
main.add_command(spectrum_cmd)
main.add_command(optimize_cmd)

if __name__ == "__main__":
    main()
