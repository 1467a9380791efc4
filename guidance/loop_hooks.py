"""The loop hooks a guided denoiser declares, and their collection over a wrapper chain.

Most guidance terms only change ``denoised``. A few also need something from the loop that drives
the solver; they declare it with :meth:`ChainNode.loop_hooks`, and every loop that runs guided
denoisers -- the :class:`~diffsample.samplers.sampler.Sampler`, twisted SMC and the diffusers
scheduler shim -- receives the collected :class:`RunHooks` and honours them, or refuses the run
before any sampling:

* ``transition`` -- replaces the draw of every stochastic step's Gaussian kernel ``N(mean, std^2 I)``
  (:class:`~diffsample.solvers.transition.Transition`; NoiseTilt, SVDD). Needs a stochastic solver.
* ``recurrence(grid, i)`` -- redo step ``i`` that many times after re-noising back to grid point ``i``
  (FreeDoM time travel).
* ``chains`` / ``score`` -- run ``chains`` independent chains and keep, per sample, the one with the
  highest ``score(x0, cond)`` (best-of-N).
* ``twist`` -- the denoiser is the proposal and twist of twisted SMC (Jeffrey guidance with
  ``particles > 1``); the loop runs the particle system. Needs a stochastic solver.

A term that declares ``transition`` or ``twist`` *acts on the noise of stochastic steps*: given a
deterministic solver that has a stochastic variant (``eta=1``), the run layer switches to it and says
so (:func:`diffsample.samplers.stochastic_variant.solver_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from diffsample.guidance.term import Cond, Denoiser
from diffsample.solvers.solver import Grid, Solver
from diffsample.solvers.transition import Transition

HOOK_NAMES = ("transition", "recurrence", "chains", "twist")


@dataclass(frozen=True)
class LoopHooks:
    """What one guided denoiser asks of the loop (all fields optional).

    Attributes:
        transition: replaces the draw of the Gaussian kernel of every stochastic step.
        recurrence: ``(grid, i) -> repeats``: time-travel repeats of step ``i`` (0 = none).
        chains: number of independent chains per sample (best-of-N; 1 = off).
        score: ``(x0 (B, *dims), cond) -> (B,)`` reward of final samples, used with ``chains > 1``.
        twist: the twisted-SMC proposal denoiser (with ``.twist`` settings and ``log_potential``).
    """

    transition: Transition | None = None
    recurrence: Callable[[Grid, int], int] | None = None
    chains: int = 1
    score: Callable[[Tensor, Cond | None], Tensor] | None = None
    twist: Any = None

    @property
    def acts_on_noise(self) -> bool:
        """Whether the hooks change the noise of stochastic steps (needs a stochastic solver)."""
        return self.transition is not None or self.twist is not None

    @property
    def empty(self) -> bool:
        return (self.transition is None and self.recurrence is None and self.chains == 1
                and self.twist is None)


@runtime_checkable
class ChainNode(Protocol):
    """A denoiser that wraps others (every guided denoiser): the loop finds hooks through it.

    ``wrapped()`` returns the denoisers it calls (the inner one; a sigma window also the guided one);
    ``loop_hooks()`` returns what it asks of the loop; ``label`` names its term in messages.
    """

    label: str

    def wrapped(self) -> tuple[Denoiser, ...]: ...

    def loop_hooks(self) -> LoopHooks: ...


@dataclass(frozen=True)
class RunHooks:
    """The hooks of a whole wrapper chain, outermost first, as ``(label, LoopHooks)`` pairs."""

    entries: tuple[tuple[str, LoopHooks], ...] = ()

    def _with(self, name: str) -> list[tuple[str, LoopHooks]]:
        if name == "chains":
            return [(label, h) for label, h in self.entries if h.chains != 1]
        return [(label, h) for label, h in self.entries if getattr(h, name) is not None]

    @property
    def transition(self) -> Transition | None:
        found = self._with("transition")
        return found[0][1].transition if found else None

    @property
    def recurrences(self) -> list[Callable[[Grid, int], int]]:
        return [h.recurrence for _, h in self._with("recurrence")]

    @property
    def best_of(self) -> LoopHooks | None:
        found = self._with("chains")
        return found[0][1] if found else None

    @property
    def twist(self) -> Any:
        found = self._with("twist")
        return found[0][1].twist if found else None

    @property
    def noise_terms(self) -> list[str]:
        """Labels of the terms that act on the noise of stochastic steps."""
        return [label for label, h in self.entries if h.acts_on_noise]

    def used(self) -> list[str]:
        """The hook names in use, e.g. ``["transition"]``."""
        return [name for name in HOOK_NAMES if self._with(name)]

    def check(self, solver: Solver) -> None:
        """Refuse combinations a run cannot honour, before any sampling.

        Raises:
            ValueError: more than one term using the transition, chains or twist hook; twisted SMC with
                another hook; a noise-acting term with a deterministic ``solver`` (the message lists
                stochastic solvers).
        """
        for name in ("transition", "chains", "twist"):
            found = self._with(name)
            if len(found) > 1:
                raise ValueError(f"at most one guidance term may use the {name} hook per run, got: "
                                 f"{', '.join(label for label, _ in found)}")
        if self.twist is not None:
            others = [name for name in ("transition", "chains", "recurrence") if self._with(name)]
            if others:
                raise ValueError(f"twisted SMC (particles > 1) cannot be combined with a guidance term using the "
                                 f"{others[0]} hook")
        if self.noise_terms and not solver.stochastic:
            raise ValueError(f"guidance {self.noise_terms[0]!r} acts on the noise of stochastic steps and solver "
                             f"{type(solver).__name__} is deterministic; use a stochastic solver: "
                             f"{stochastic_solver_names()}")


def stochastic_solver_names() -> str:
    """The registered solvers that are stochastic as registered, plus the ``eta=1`` variants (for
    messages)."""
    from diffsample.solvers import SOLVERS

    names = [name for name in SOLVERS if getattr(SOLVERS.create(name), "stochastic", False)]
    return ", ".join(names + ["ddim:eta=1", "stein-dpm:eta=1"])


def collect_hooks(denoiser: Denoiser) -> RunHooks:
    """The :class:`RunHooks` of ``denoiser``'s wrapper chain (followed through :class:`ChainNode`
    ``wrapped()``), outermost first; nodes without hooks are skipped."""
    entries: list[tuple[str, LoopHooks]] = []
    stack, seen = [denoiser], set()
    while stack:
        d = stack.pop(0)
        if id(d) in seen:
            continue
        seen.add(id(d))
        if isinstance(d, ChainNode):
            hooks = d.loop_hooks()
            if not hooks.empty:
                entries.append((d.label, hooks))
            stack += list(d.wrapped())
    return RunHooks(tuple(entries))


class _Nothing:
    """Placeholder denoiser for building a term's wrapper without a model (hook discovery)."""

    def __init__(self, noise_schedule: Any) -> None:
        self.noise_schedule = noise_schedule

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:  # pragma: no cover
        raise RuntimeError("hook discovery placeholder called")


def term_hooks(terms: Any, noise_schedule: Any) -> RunHooks:
    """The hooks the guidance ``terms`` would declare when wrapped (in order) around a denoiser with
    ``noise_schedule``; nothing is evaluated."""
    guided: Any = _Nothing(noise_schedule)
    for term in terms:
        guided = term(guided)
    return collect_hooks(guided)
