"""Switching a deterministic solver to its stochastic variant for terms that act on the noise.

NoiseTilt, SVDD and twisted SMC change the noise of stochastic steps
(:attr:`~diffsample.guidance.loop_hooks.LoopHooks.acts_on_noise`). Given a deterministic solver that
has a stochastic variant -- one whose registry entry takes ``eta`` (DDIM / Euler, DPM-Solver++,
SteinDiff over DPM-Solver++) -- the run uses ``eta=1`` (the DDPM-like ancestral / SDE step) and says
so; a solver without one (Heun, UniPC) is refused before sampling.
"""

from __future__ import annotations

import warnings

from diffsample.core.spec import Spec
from diffsample.guidance.loop_hooks import RunHooks, stochastic_solver_names
from diffsample.solvers import SOLVERS


class SolverSwitched(UserWarning):
    """A noise-acting guidance term switched a deterministic solver to its stochastic variant."""


def stochastic_variant(spec: str | Spec) -> Spec | None:
    """``spec`` itself when its solver is stochastic, its ``eta=1`` variant when that is stochastic,
    else ``None``.

    Raises:
        ValueError: an unknown solver or bad options (the registry's message).
    """
    spec = Spec.parse(spec)
    if SOLVERS.create(str(spec)).stochastic:
        return spec
    if SOLVERS.accepts(str(spec), "eta"):
        variant = spec.with_options(eta=1.0)
        if SOLVERS.create(str(variant)).stochastic:
            return variant
    return None


def solver_for(spec: str | Spec, hooks: RunHooks) -> tuple[Spec, str | None]:
    """The solver spec a run with ``hooks`` uses, and the one-line note to print when it differs.

    Raises:
        ValueError: a noise-acting term with a solver that has no stochastic variant (the message
            names the term, the solver and the stochastic solvers).
    """
    spec = Spec.parse(spec)
    if not hooks.noise_terms or SOLVERS.create(str(spec)).stochastic:
        return spec, None
    variant = stochastic_variant(spec)
    term = hooks.noise_terms[0]
    if variant is None:
        raise ValueError(f"guidance {term!r} acts on the noise of stochastic steps and solver {str(spec)!r} is "
                         f"deterministic with no stochastic variant; use one of: {stochastic_solver_names()}")
    return variant, (f"guidance {term!r} acts on the noise of stochastic steps: solver {str(spec)!r} runs as its "
                     f"stochastic variant {str(variant)!r}")


def switch_for_noise_terms(spec: str | Spec, hooks: RunHooks) -> Spec:
    """:func:`solver_for`, warning once (:class:`SolverSwitched`, the one-line note) when it switches.

    Raises:
        ValueError: as :func:`solver_for`.
    """
    resolved, note = solver_for(spec, hooks)
    if note is not None:
        warnings.warn(note, SolverSwitched, stacklevel=3)
    return resolved
