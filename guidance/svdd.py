"""SVDD: soft value-based decoding by search over candidate draws of the pretrained kernel (Li et
al., arXiv 2408.08252, SVDD-PM)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffsample.core.accounting import add_event
from diffsample.solvers.solver import Grid

from diffsample.guidance._common import GuidedDenoiser
from diffsample.guidance.loop_hooks import LoopHooks
from diffsample.guidance.term import Cond, Denoiser
from diffsample.guidance.rewards import Reward, as_reward, check_reward


@dataclass(frozen=True)
class SVDD:
    """At each stochastic step draw ``particles`` candidates ``x^(m) = mean + std z_m`` from the
    pretrained kernel, score them with the plug-in value ``v_m = r(decode(D(x^(m), t_next)))`` and
    keep ``m* = argmax v`` (``temperature = 0``) or ``m* ~ softmax(v / temperature)``
    (docs/methods/reward_baselines.md#svdd). No gradients.

    The candidates' denoiser outputs are evaluated in one batched call of ``B * particles`` rows;
    the chosen one's is reused by the next step's own call, so a step costs ``particles`` model
    evaluations (plus 1 on the first step). Needs a stochastic solver.

    Args:
        reward: a :class:`~.rewards.Reward` or callable ``(x0) -> (B,)`` (need not be differentiable).
        particles: ``M >= 1`` candidates per step (``M = 1`` is the base sampler, bit for bit).
        temperature: ``>= 0``; 0 is greedy.
        decode: latent -> sample decoder before the reward, or ``None``.
        seed: seed of the generator used for softmax selection.

    Raises:
        ValueError: ``particles < 1``, ``temperature < 0``.
    """

    reward: Reward | Callable[..., Tensor]
    particles: int = 8
    temperature: float = 0.0
    decode: Callable[[Tensor], Tensor] | None = None
    seed: int = 0
    name: str = field(default="svdd", repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.particles, bool) or not isinstance(self.particles, int) or self.particles < 1:
            raise ValueError(f"svdd: particles (K) must be an integer >= 1, got {self.particles!r}")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"svdd: temperature must be a finite number >= 0, got {self.temperature}")
        object.__setattr__(self, "reward", as_reward(self.reward))

    @property
    def batch_coupled(self) -> bool:
        """With ``temperature > 0`` and several candidates, the pick is drawn from one generator
        shared by the batch, so a sample's result depends on its batch (and the batch size)."""
        return self.particles > 1 and self.temperature > 0

    def __call__(self, denoiser: Denoiser) -> "SVDDDenoiser":
        return SVDDDenoiser(denoiser, self)


class SVDDDenoiser(GuidedDenoiser):
    stochastic_only = True

    def __init__(self, inner: Denoiser, term: SVDD) -> None:
        super().__init__(inner, term)
        self.cond: Cond | None = None
        self.cache: tuple[Tensor, float, Tensor] | None = None
        self.generator = torch.Generator().manual_seed(term.seed)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        self.cond = cond
        if self.cache is not None:
            x_c, t_c, d_c = self.cache
            self.cache = None
            if x_c is x and float(t.reshape(-1)[0]) == t_c:
                return d_c
        return self.inner(x, t, cond)

    def loop_hooks(self) -> LoopHooks:
        """SVDD acts through the draw of every stochastic step (a search over candidate draws)."""
        return LoopHooks(transition=self.transition)

    def transition(self, mean: Tensor, std: float, grid: Grid, i: int, draw: Callable[[], Tensor]) -> Tensor:
        term, b = self.term, mean.shape[0]
        if i == 0:
            self.generator.manual_seed(term.seed)
        if term.particles == 1:
            return mean + std * draw()
        cands = torch.stack([mean + std * draw() for _ in range(term.particles)], 1)  # (B, M, ...)
        flat = cands.flatten(0, 1)
        t_next = torch.full((flat.shape[0],), grid.t_list[i + 1], dtype=torch.float64, device=mean.device)
        cond = _repeat_cond(self.cond, term.particles)
        denoised = self.inner(flat, t_next, cond)
        decoded = term.decode(denoised) if term.decode is not None else denoised
        values = check_reward(term.reward(decoded, cond), decoded, term.reward, need_grad=False)
        add_event("reward_evals", flat.shape[0])
        values = values.reshape(b, term.particles).double()
        if term.temperature == 0.0:
            pick = values.argmax(1)
        else:
            probs = torch.softmax(values / term.temperature, 1).cpu()
            pick = torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(mean.device)
        rows = torch.arange(b, device=mean.device)
        x_next = cands[rows, pick]
        self.cache = (x_next, grid.t_list[i + 1], denoised.reshape(b, term.particles, *mean.shape[1:])[rows, pick])
        return x_next


def _repeat_cond(cond: Cond | None, m: int) -> Cond | None:
    """``cond`` with every batch-first tensor repeated ``m`` times per row (candidate-major within a row)."""
    if cond is None:
        return None
    return cond.map(lambda v: v.repeat_interleave(m, 0) if isinstance(v, Tensor) and v.ndim else v)
