"""The reward gradient of gradient-based reward guidance (NoiseTilt, DPS, FreeDoM), with exact cost
accounting: ``g = grad_{x_t} r(decode(D(x_t)))`` through the denoiser (one VJP, charged as
``2 x`` the forward rows it passes back through), or the cheap estimate
``grad_{x0} r(decode(x0)) / alpha_t`` at ``x0 = D(x_t)`` (no denoiser VJP; ``dD/dx_t ~ I / alpha_t``
at low noise; not what the papers use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffsample.core.accounting import add_backward_evals, add_event, forward_rows, measure_model_evals

from diffsample.guidance._common import alpha_sigma
from diffsample.guidance.term import Cond, Denoiser
from diffsample.guidance.rewards import Reward, RewardError, check_reward

GRAD_WRT = ("x_t", "x0hat")


class RewardGrad(NamedTuple):
    """``denoised`` (B, *dims) -- attached to the caller's graph when its ``x`` required grad --,
    ``reward`` (B,) and ``grad`` (B, *dims, the gradient with respect to ``x_t``), both detached."""

    denoised: Tensor
    reward: Tensor
    grad: Tensor


def check_grad_wrt(value: str, who: str) -> None:
    if value not in GRAD_WRT:
        raise ValueError(f"{who}: unknown grad_wrt {value!r}; valid: {', '.join(GRAD_WRT)}")


def reward_grad(inner: Denoiser, x: Tensor, t: Tensor, cond: Cond | None, reward: Reward,
                decode: Callable[[Tensor], Tensor] | None = None, grad_wrt: str = "x_t") -> RewardGrad:
    """Evaluate ``D(x_t)``, the reward of ``decode(D)`` and its gradient.

    ``grad_wrt="x_t"``: ``grad_{x_t} r(decode(D(x_t)))`` (DPS, arXiv 2209.14687 eq. 16; NoiseTilt
    arXiv 2606.18066); ``"x0hat"``: ``grad_{x0} r(decode(x0)) / alpha_t`` at ``x0 = D(x_t)``.

    When ``x`` itself requires grad (a SteinDiff probe differentiating the step), the returned
    ``denoised`` keeps its graph to ``x``; otherwise it is detached. Records the event
    ``"reward_evals"`` (rows) and, for ``"x_t"``, the backward pass (:func:`add_backward_evals`).

    Raises:
        RewardError: the reward's output has the wrong shape, non-finite values or no gradient.
    """
    track = x.requires_grad
    with torch.enable_grad():
        xg = x if track else x.detach().requires_grad_(True)
        if grad_wrt == "x_t":
            with measure_model_evals() as rows:
                denoised = inner(xg, t, cond)
            source, at = denoised, xg
        else:
            denoised = inner(xg, t, cond) if track else inner(x.detach(), t, cond)
            source = at = denoised.detach().requires_grad_(True)
        decoded = decode(source) if decode is not None else source
        value = check_reward(reward(decoded, cond), decoded, reward, need_grad=True)
        (grad,) = torch.autograd.grad(value.sum(), at, retain_graph=track, allow_unused=True)
    if grad is None:
        raise RewardError(f"reward {getattr(reward, 'name', reward)!r} returned no gradient with respect to the sample")
    grad = grad.detach().to(x.dtype)
    if grad_wrt == "x_t":
        add_backward_evals(forward_rows(rows))
    else:
        grad = grad / alpha_sigma(inner.noise_schedule, t, x)[0]
    add_event("reward_evals", x.shape[0])
    return RewardGrad(denoised if track else denoised.detach(), value.detach(), grad)
