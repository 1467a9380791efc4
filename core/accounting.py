"""Counting model evaluations (``model_evals``, docs/design.md#nfe-and-model_evals) and run events.

Network adapters call :func:`add_model_evals` with the number of *rows* they pass through the
network (a CFG call on a doubled batch adds ``2 B``; a VJP pass adds ``2 B`` as it counts as two
forward-equivalents). The sampler opens :func:`count_model_evals` around a run and divides the
total by the batch size, giving forward-equivalents per sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_COUNTER: ContextVar[list[float] | None] = ContextVar("diffsample_model_evals", default=None)
_EVENTS: ContextVar[dict[str, int] | None] = ContextVar("diffsample_events", default=None)


def add_model_evals(rows: float, backward: bool = False) -> None:
    """Record ``rows`` network rows (forward-equivalents x batch items); no-op outside a counter.
    ``backward=True`` marks them as the charge of a backward pass (``counter[1]`` keeps that part)."""
    counter = _COUNTER.get()
    if counter is not None:
        counter[0] += rows
        if backward:
            counter[1] += rows


@contextmanager
def _counter(propagate: bool) -> Iterator[list[float]]:
    """Install a fresh ``[rows, backward_rows]`` counter; on exit add it to the enclosing one if
    ``propagate``."""
    outer = _COUNTER.get()
    counter = [0.0, 0.0]
    token = _COUNTER.set(counter)
    try:
        yield counter
    finally:
        _COUNTER.reset(token)
        if propagate and outer is not None:
            outer[0] += counter[0]
            outer[1] += counter[1]


def count_model_evals():
    """Context manager yielding ``[rows, backward_rows]``: the running row count (``[0]``) and the
    part of it charged for backward passes (``[1]``) of one run (not added to any enclosing count)."""
    return _counter(propagate=False)


def measure_model_evals():
    """Like :func:`count_model_evals` for a part of a run: yields ``[rows, backward_rows]`` added
    inside the block (forward rows: ``rows - backward_rows``) and passes them on to the enclosing
    counter (if any) on exit. Used to charge a backward pass through exactly the network passes a
    forward call made (2 forward-equivalents per row)."""
    return _counter(propagate=True)


def forward_rows(measured: list[float]) -> float:
    """Forward network rows of a :func:`measure_model_evals` result (backward charges removed)."""
    return measured[0] - measured[1]


def add_backward_evals(forward_rows: float) -> None:
    """Charge one backward (VJP) pass through a forward call that used ``forward_rows`` network rows:
    ``2 * forward_rows`` model evaluations (docs/design.md#nfe-and-model_evals), also counted as the event
    ``"backward_rows"`` so forward passes alone can be recovered (``model_evals - 2 * backward``)."""
    add_model_evals(2 * forward_rows, backward=True)
    add_event("backward_rows", int(round(forward_rows)))


def add_event(name: str, count: int = 1) -> None:
    """Count a named event of the current run (e.g. ``"stein_fallback"``); no-op outside a run."""
    events = _EVENTS.get()
    if events is not None:
        events[name] = events.get(name, 0) + count


@contextmanager
def count_events() -> Iterator[dict[str, int]]:
    """Context manager yielding the dict of event counts of the enclosed run."""
    events: dict[str, int] = {}
    token = _EVENTS.set(events)
    try:
        yield events
    finally:
        _EVENTS.reset(token)
