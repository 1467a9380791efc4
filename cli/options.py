"""Shared click helpers: registry-checked choices and error conversion (exit code 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def registry_spec(registry_name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback checking ``name[:k=v,...]`` specs against a registry (``solvers``,
    ``schedules`` or ``guidance``); a bad spec is a usage error (exit code 2) listing valid names."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from diffsample.guidance import GUIDANCE
        from diffsample.solvers import SOLVERS, STEP_SCHEDULES

        registry = {"solvers": SOLVERS, "schedules": STEP_SCHEDULES, "guidance": GUIDANCE}[registry_name]
        for spec in (value if isinstance(value, tuple) else (value,)):
            if spec is None:
                continue
            try:
                registry.check(spec)
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
        return value

    return check


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


def cache_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check a cache-file option: ``None`` (the default location) and ``""`` / ``"none"`` (no
    caching) pass; a path must be creatable or rewritable (not a directory, not under a file,
    writable), else a usage error (exit code 2)."""
    if value is None:
        return None
    from diffsample.guidance.jeffrey.model_marginal import resolve_cache_path

    try:
        resolve_cache_path(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def fail(message: str) -> None:
    """Stop with one line on stderr and exit code 2 (bad input; nothing written)."""
    raise click.UsageError(message)
