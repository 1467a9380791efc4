"""Shared click helpers: registry-checked choices and error conversion (exit code 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


# registry word -> (module, attribute); a registry is imported only when a command needs it, and
# importing one imports no guidance, pipeline or diffusers module (entries are lazy factories).
REGISTRIES = {
    "solvers": ("diffsample.solvers", "SOLVERS"),
    "schedules": ("diffsample.solvers", "STEP_SCHEDULES"),
    "guidance": ("diffsample.guidance", "GUIDANCE"),
    "rewards": ("diffsample.guidance.rewards", "REWARDS"),
}


def registry(word: str) -> Any:
    """The registry called ``word`` (a key of :data:`REGISTRIES`), imported on demand."""
    import importlib

    module, attr = REGISTRIES[word]
    return getattr(importlib.import_module(module), attr)


def registry_spec(registry_name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback checking ``name[:k=v,...]`` specs against a registry (``solvers``,
    ``schedules`` or ``guidance``): the name (listing valid names), and the option keys and value
    types where options are given. A bad spec is a usage error (exit code 2). Imports only that
    registry; checking a name imports no factory."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        reg = registry(registry_name)
        if registry_name == "schedules":
            value = tuple(map(schedule_file_spec, value)) if isinstance(value, tuple) else schedule_file_spec(value)
        for spec in (value if isinstance(value, tuple) else (value,)):
            if spec is None:
                continue
            try:
                reg.check(spec)
                if registry_name == "schedules" and spec.startswith("file:"):
                    reg.create(spec)  # reads and checks the file now: a bad one is refused before any work
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
        return value

    return check


def schedule_file_spec(value: Any) -> Any:
    """``FILE.json`` (a name ending in ``.json``) as the step-schedule spec ``file:path=FILE.json``
    (a schedule written by ``diffsample optimize-schedule``); anything else unchanged."""
    if isinstance(value, str) and value.lower().endswith(".json") and not value.startswith("file:"):
        from diffsample.core.spec import format_value

        return f"file:path={format_value(value)}"
    return value


def int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """Parse ``"5,10,20"`` into ``[5, 10, 20]`` (each >= 1)."""
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise click.BadParameter(f"every value must be an integer >= 1, got {value!r}")
    return items


def fail(message: str) -> None:
    """Stop with one line on stderr and exit code 2 (bad input; nothing written)."""
    raise click.UsageError(message)


class FiniteFloat(click.FloatRange):
    """A float option in a range that also refuses ``inf`` / ``nan`` (e.g. ``--cfg-scale 1e309``)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
