"""Exact recursive retraining with truncation on a Gaussian mixture (arXiv 2606.13796 in closed form).

With a perfect score, a sampler stopped at OU time ``tau`` returns ``U_tau`` of its training law;
on an isotropic Gaussian mixture this is again such a mixture (:func:`ou_push`), so the recursion
``p_{i+1} = U_{t0_i}(alpha p_data + (1 - alpha) p_i)`` stays in closed form (:func:`recursion`),
with ``(i + 2) K`` components after generation ``i``. :func:`projected_hermite_moments` gives the
exact normalised Hermite moments of 1-D projections by Gauss-Hermite quadrature, independently of
the OU eigen-relation the method relies on. docs/methods/truncation.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffsample.testbed.gmm import GaussianMixture


def ou_push(gmm: GaussianMixture, tau: float) -> GaussianMixture:
    """``U_tau(gmm)``: the law of ``e^{-tau/2} X0 + sqrt(1 - e^{-tau}) Z`` for ``X0 ~ gmm``:
    means scale by ``a = e^{-tau/2}``, variances become ``a^2 s^2 + 1 - a^2``.

    Raises:
        ValueError: ``tau < 0``.
    """
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    a = math.exp(-tau / 2)
    return GaussianMixture(a * gmm.means, torch.sqrt(a * a * gmm.stds**2 + (1 - a * a)), gmm.weights)


def mix(first: GaussianMixture, alpha: float, second: GaussianMixture) -> GaussianMixture:
    """``alpha first + (1 - alpha) second`` as one mixture (components concatenated)."""
    if alpha >= 1:
        return first
    return GaussianMixture(torch.cat([first.means, second.means]), torch.cat([first.stds, second.stds]),
                           torch.cat([alpha * first.weights, (1 - alpha) * second.weights]))


def recursion(p_data: GaussianMixture, alpha: float, t0_of, generations: int) -> list[GaussianMixture]:
    """The ideal (perfect-score) retraining recursion: ``[p_1, ..., p_G]`` with
    ``p_{i+1} = U_{t0_of(i)}(alpha p_data + (1 - alpha) p_i)``, ``p_0 = p_data``.

    ``t0_of``: generation -> OU time (e.g. ``TruncationSchedule.t0_at``) or a constant.
    """
    t0 = t0_of if callable(t0_of) else (lambda i: float(t0_of))
    p, out = p_data, []
    for i in range(generations):
        p = ou_push(mix(p_data, alpha, p) if i > 0 else p_data, t0(i))
        out.append(p)
    return out


def projected_hermite_moments(gmm: GaussianMixture, dirs, n_max: int = 8, nodes: int = 80) -> np.ndarray:
    """Exact ``E[He_n(w . X)] / sqrt(n!)`` for ``X ~ gmm``, shape ``(n_max + 1, M)`` for unit
    directions ``dirs`` ``(M, D)``: each component projects to ``N(w . mu_j, s_j^2)``, integrated
    with ``nodes``-point Gauss-Hermite quadrature (exact for polynomials of degree < ``2 nodes``)."""
    from numpy.polynomial.hermite_e import hermegauss, hermeval

    w = np.asarray(dirs, dtype=float)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    z, q = hermegauss(nodes)
    q = q / q.sum()
    mu = gmm.means.numpy() @ w.T  # (K, M)
    s = gmm.stds.numpy()[:, None, None]
    pts = mu[:, :, None] + s * z[None, None, :]  # (K, M, nodes)
    out = np.empty((n_max + 1, w.shape[0]))
    for n in range(n_max + 1):
        coef = np.zeros(n + 1)
        coef[n] = 1.0
        vals = hermeval(pts, coef) @ q  # (K, M)
        out[n] = gmm.weights.numpy() @ vals / math.sqrt(math.factorial(n))
    return out
