"""Exact class-conditional Gaussian-mixture models for guidance tests (class = component).

Everything here is a closed form from :mod:`diffsample.testbed.gmm`; no guidance code is used.
"""

from __future__ import annotations


import torch
from torch import Tensor

from diffsample.guidance import Cond
from diffsample.solvers import LinearVP
from diffsample.core.accounting import add_model_evals
from diffsample.testbed.gmm import GaussianMixture

NS = LinearVP()
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
STDS = torch.tensor([0.55, 0.5, 0.45], dtype=torch.float64)
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
PI_STAR = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)


def mixture(weights: Tensor, means: Tensor = MEANS, stds: Tensor = STDS) -> GaussianMixture:
    return GaussianMixture(means, stds, weights)


def alpha_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(t, dtype=torch.float64)
    return NS.alpha(t), NS.sigma(t)


def component_denoised(gmm: GaussianMixture, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """Exact ``E[x0 | x_t, y]`` for component ``y`` (per row)."""
    a, s = alpha_sigma(t)
    a, s = a.reshape(-1, 1), s.reshape(-1, 1)
    mu, s2 = gmm.means[y], (gmm.stds[y] ** 2)[:, None]
    return mu + a * s2 / (a**2 * s2 + s**2) * (x - a * mu)


class ConditionalGMM:
    """``(x, t, cond) -> denoised``: ``class_labels`` ``< K`` selects a component, ``K`` (the null
    label) or no cond gives the whole mixture. One model evaluation per row."""

    def __init__(self, gmm: GaussianMixture) -> None:
        self.gmm, self.noise_schedule = gmm, NS
        self.k = gmm.means.shape[0]

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        add_model_evals(x.shape[0])
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        a, s = alpha_sigma(t)
        full = self.gmm.denoised(x, a, s)
        if cond is None or "class_labels" not in cond.positive:
            return full
        y = torch.as_tensor(cond.positive["class_labels"]).long()
        uncond = y >= self.k
        comp = component_denoised(self.gmm, x, t, y.clamp(max=self.k - 1))
        return torch.where(uncond[:, None], full, comp)


def labels_cond(y: Tensor, k: int) -> Cond:
    return Cond({"class_labels": y}, {"class_labels": torch.full_like(y, k)})


def noisy_classifier(gmm: GaussianMixture):
    """The exact noisy classifier ``log p_t(y | x_t)`` (differentiable), ``t`` in NS time."""

    def classify(x: Tensor, t: Tensor) -> Tensor:
        a, s = alpha_sigma(t)
        return torch.log(gmm.component_posterior(x, a.to(x), s.to(x)))

    return classify


def assign(gmm: GaussianMixture, x: Tensor) -> Tensor:
    """Component of each clean sample by argmax responsibility."""
    return gmm.component_posterior(x).argmax(1)


def proportions(labels: Tensor, k: int) -> Tensor:
    return torch.bincount(labels, minlength=k).to(torch.float64) / labels.numel()


def within_two_sigma(p_hat: Tensor, p: Tensor, n: int) -> bool:
    band = 2 * torch.sqrt(p * (1 - p) / n)
    return bool(((p_hat - p).abs() <= band + 1e-12).all())


def mutual_information(joint: Tensor) -> float:
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    m = joint > 0
    return float((joint[m] * torch.log(joint[m] / (pa * pb)[m])).sum())


