"""Private helpers shared by guidance terms: per-row alpha / sigma, prediction-space changes,
branch calls and a run-state tracker for stateful terms (APG momentum, CFG-Zero* zero-init)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffsample.solvers.numerics import alpha_sigma, append_dims  # noqa: F401  (alpha_sigma re-exported)
from diffsample.solvers.solver import NoiseSchedule

from diffsample.guidance.loop_hooks import LoopHooks
from diffsample.guidance.term import Cond, Denoiser

SPACES = ("x0", "eps", "flow")


def sigma_ve(noise_schedule: NoiseSchedule, t: Tensor, batch: int) -> Tensor:
    """VE sigma ``sigma / alpha`` per row, shape ``(B,)``, float64."""
    t64 = torch.as_tensor(t, dtype=torch.float64)
    if t64.ndim == 0:
        t64 = t64.expand(batch)
    return noise_schedule.sigma_ve(t64.cpu())


class GuidedDenoiser:
    """Base of the denoisers guidance terms return: keeps the inner denoiser, the term (its frozen
    configuration) and the inner noise schedule. A :class:`~diffsample.guidance.loop_hooks.ChainNode`:
    subclasses that need something from the sampling loop override :meth:`loop_hooks`."""

    def __init__(self, inner: Denoiser, term: Any) -> None:
        self.inner, self.term = inner, term
        self.noise_schedule = inner.noise_schedule
        self.label = getattr(term, "name", None) or type(term).__name__

    def wrapped(self) -> tuple[Denoiser, ...]:
        """The denoisers this one calls."""
        return (self.inner,)

    def loop_hooks(self) -> LoopHooks:
        """What this denoiser asks of the sampling loop (nothing by default)."""
        return LoopHooks()


def check_space(space: str, who: str) -> None:
    if space not in SPACES:
        raise ValueError(f"{who}: unknown space {space!r}; valid: {', '.join(SPACES)}")


def to_space(denoised: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, space: str) -> Tensor:
    """``denoised`` as ``x0`` (itself), ``eps = (x - alpha x0) / sigma`` or the flow velocity
    ``u = eps - x0``."""
    if space == "x0":
        return denoised
    eps = (x - alpha * denoised) / sigma
    return eps if space == "eps" else eps - denoised


def from_space(pred: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, space: str) -> Tensor:
    """Inverse of :func:`to_space` at fixed ``x, t``."""
    if space == "x0":
        return pred
    if space == "eps":
        return (x - sigma * pred) / alpha
    return (x - sigma * pred) / (alpha + sigma)


def branches(cond: Cond | None, who: str) -> tuple[Cond, Cond]:
    """The positive and negative branches of ``cond`` as two ``Cond`` objects.

    Raises:
        ValueError: ``cond`` is ``None`` or has no negative branch.
    """
    if cond is None or cond.negative is None:
        raise ValueError(f"{who} needs a conditional model and a cond with a negative (unconditional) branch; "
                         "got " + ("no cond" if cond is None else "cond.negative=None"))
    return Cond(cond.positive), Cond(cond.negative)


def call_both(inner: Denoiser, x: Tensor, t: Tensor, cond: Cond | None, who: str) -> tuple[Tensor, Tensor]:
    """``(d_pos, d_neg)``: the two branches evaluated in one batched call (``2 B`` rows).

    Batched when every positive/negative value is a tensor with the batch as first dimension;
    otherwise two calls. Either way ``model_evals`` grows by ``2 B``.
    """
    pos, neg = branches(cond, who)
    b = x.shape[0]
    keys = set(pos.positive) | set(neg.positive)
    if keys and set(pos.positive) == set(neg.positive) and all(
            isinstance(pos.positive[k], Tensor) and isinstance(neg.positive[k], Tensor)
            and pos.positive[k].shape[:1] == (b,) and neg.positive[k].shape == pos.positive[k].shape for k in keys):
        both = Cond({k: torch.cat([pos.positive[k], neg.positive[k]]) for k in keys})
        t2 = torch.as_tensor(t)
        t2 = torch.cat([t2, t2]) if t2.ndim else t2
        out = inner(torch.cat([x, x]), t2, both)
        return out[:b], out[b:]
    return inner(x, t, pos), inner(x, t, neg)


def target_labels(x: Tensor, cond: Cond | None, label: int | None, key: str, who: str) -> Tensor:
    """Per-row target class ``(B,)``: ``label`` if given, else ``cond.positive[key]``.

    Raises:
        ValueError: neither is available (the message starts with ``who``).
    """
    if label is not None:
        return torch.full((x.shape[0],), int(label), dtype=torch.long, device=x.device)
    if cond is None or key not in cond.positive:
        raise ValueError(f"{who} needs a target class: give label=K or a cond with positive[{key!r}] "
                         "(a class-conditional model with class labels)")
    return torch.as_tensor(cond.positive[key], device=x.device).long().reshape(-1)


def class_log_prob(logits: Tensor, y: Tensor, who: str) -> Tensor:
    """``log softmax(logits)[y]`` per row, shape ``(B,)``.

    Raises:
        ValueError: a label outside ``0 .. K - 1``.
    """
    if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
        raise ValueError(f"{who}: target class {sorted(set(y.tolist()))} outside 0..{logits.shape[1] - 1}")
    return torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)


def row_norm(v: Tensor) -> Tensor:
    """Euclidean norm over all non-batch dims, shaped ``(B, 1, ..., 1)``."""
    return append_dims(v.reshape(v.shape[0], -1).norm(dim=1), v.ndim)


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    return append_dims((a.reshape(a.shape[0], -1) * b.reshape(b.shape[0], -1)).sum(1), a.ndim)


class RunState:
    """Tracks the distinct noise levels a stateful wrapper has seen in the current run.

    A run is a sequence of calls with non-increasing ``t``; a call at a larger ``t`` than the last
    one (a new sample run) resets the state. ``step`` counts distinct ``t`` values so far (0-based),
    so a 2-stage solver's intermediate evaluations count as their own levels.
    """

    def __init__(self) -> None:
        self.last_t: float | None = None
        self.step = -1
        self.data: dict[str, Any] = {}

    def update(self, t: Tensor) -> bool:
        """Register a call at ``t``; returns ``True`` when a new run started (state was reset)."""
        tv = float(torch.as_tensor(t).reshape(-1)[0])
        reset = self.last_t is None or tv > self.last_t
        if reset:
            self.step, self.data = 0, {}
        elif tv < self.last_t:
            self.step += 1
        self.last_t = tv
        return reset
