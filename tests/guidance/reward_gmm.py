"""The high-dimensional problem of docs/methods/gaussian_mixture.md: a 2-D Gaussian mixture embedded densely (random
orthonormal ``U``) in ``R^D`` with an isotropic complement, and a linear reward along ``U a``.

Every quantity the reward-guidance tests compare against is a closed form here: the tilted target
``p0(x) exp(a^T x / lam)`` of an isotropic mixture ``sum_k pi_k N(mu_k, s^2 I)`` is the mixture
with ``pi'_k ∝ pi_k exp(a^T mu_k / lam)`` (the ``s^2 ||a||^2 / (2 lam^2)`` term is common to all
components), ``mu'_k = mu_k + s^2 a / lam``, same ``s``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffsample.samplers.sampler import StepInfo
from diffsample.solvers import LinearVP
from diffsample.testbed.gmm import GaussianMixture

NS = LinearVP()
MEANS_2D = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
STD = 0.5
A_2D = torch.tensor([1.0, 0.5], dtype=torch.float64)
LAM = 0.7


class Setup:
    """The embedded mixture in ``dim`` dimensions, its reward vector and its exact tilted target."""

    def __init__(self, dim: int = 1024, seed: int = 0, lam: float = LAM) -> None:
        g = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
        self.u, self.dim, self.lam = u, dim, lam
        self.gmm = GaussianMixture(MEANS_2D @ u.T, torch.full((3,), STD, dtype=torch.float64), PI)
        self.a = u @ A_2D  # (D,)
        logits = torch.log(PI) + (self.gmm.means @ self.a) / lam
        self.pi_star = torch.softmax(logits, 0)
        self.target = GaussianMixture(self.gmm.means + STD**2 * self.a / lam, self.gmm.stds, self.pi_star)
        self.reward_star = float((self.pi_star * (self.target.means @ self.a)).sum())

    def reward(self, x0: Tensor) -> Tensor:
        return x0.reshape(x0.shape[0], -1) @ self.a.to(x0)

    def proportions(self, x0: Tensor) -> Tensor:
        """Fractions of samples assigned (argmax responsibility under the target's components)."""
        k = self.target.component_posterior(x0.double()).argmax(1)
        return torch.bincount(k, minlength=3).double() / x0.shape[0]

    def complement_var(self, x0: Tensor) -> float:
        x = x0.double()
        rest = x - (x @ self.u) @ self.u.T
        return float(rest.pow(2).sum(1).mean() / (self.dim - 2))


class OffManifold:
    """Callback accumulating the exact ``-log p_t(x_t)`` of the unguided marginal along a run
    (mean over samples, per grid point ``i + 1`` with ``sigma > 0``)."""

    def __init__(self, gmm: GaussianMixture) -> None:
        self.gmm, self.values = gmm, []

    def __call__(self, info: StepInfo) -> None:
        i1 = info.i + 1
        a, s = info.grid.alpha_list[i1], info.grid.sigma_list[i1]
        if s > 0:
            self.values.append(float(-self.gmm.log_prob(info.x.double(), a, s).mean()))

    @property
    def index(self) -> float:
        return sum(self.values) / len(self.values)


def tv(p: Tensor, q: Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def binomial_sd(p: Tensor, n: int) -> Tensor:
    return (p * (1 - p) / n).sqrt().clamp_min(1.0 / n) * math.sqrt(1.0)
