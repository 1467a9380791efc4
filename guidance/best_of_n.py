"""Best-of-N: run N independent chains, keep the sample with the highest reward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from diffsample.guidance._common import GuidedDenoiser
from diffsample.guidance.loop_hooks import LoopHooks
from diffsample.guidance.term import Cond, Denoiser
from diffsample.guidance.rewards import Reward, as_reward, check_reward


@dataclass(frozen=True)
class BestOfN:
    """Best-of-N selection (docs/methods/reward_baselines.md#best-of-n): the sampler runs ``n`` independent
    chains of the wrapped (possibly guided) denoiser per sample and keeps, per sample, the final
    sample with the largest ``reward(decode(x0))``. On top of NoiseTilt / DPS / FreeDoM this is
    the "dagger" variant of the NoiseTilt paper (NTRK-dagger, DPS-dagger). Cost: ``n`` times the
    chain's NFE and model evaluations, ``n`` reward calls per sample at the end, no backprop.

    The reward's CDF gives the exact check: ``P(R_BoN <= u) = F_R(u)^n``.

    Raises:
        ValueError: ``n < 1``.
    """

    reward: Reward | Callable[..., Tensor]
    n: int = 4
    decode: Callable[[Tensor], Tensor] | None = None
    name: str = field(default="best_of_n", repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"best_of_n: N must be an integer >= 1, got {self.n!r}")
        object.__setattr__(self, "reward", as_reward(self.reward))

    def __call__(self, denoiser: Denoiser) -> "BestOfNDenoiser":
        return BestOfNDenoiser(denoiser, self)


class BestOfNDenoiser(GuidedDenoiser):
    """Passes calls through; the loop runs ``chains`` chains and keeps the best by :meth:`score`."""

    def loop_hooks(self) -> LoopHooks:
        return LoopHooks(chains=self.chains, score=self.score)

    @property
    def chains(self) -> int:
        return self.term.n

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        return self.inner(x, t, cond)

    def score(self, x0: Tensor, cond: Cond | None) -> Tensor:
        """Reward of final samples ``(B, *dims)`` -> ``(B,)``."""
        term = self.term
        decoded = term.decode(x0) if term.decode is not None else x0
        return check_reward(term.reward(decoded, cond), decoded, term.reward, need_grad=False).detach()
