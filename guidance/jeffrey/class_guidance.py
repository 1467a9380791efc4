"""Jeffrey marginal guidance (arXiv 2606.13240): replace the model's class marginal by a target
``p*(y)`` while keeping ``p(x | y)`` (Jeffrey's rule), as a denoiser wrapper."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffsample.guidance._common import GuidedDenoiser
from diffsample.guidance.term import Cond, Denoiser, PrepareContext
from diffsample.guidance.classifier import BASES, ESTIMATORS, base_cond, check_choice, guided_denoised
from diffsample.guidance.jeffrey.class_marginal import log_weights
from diffsample.guidance.jeffrey.model_marginal import ModelMarginal, check_count, model_marginal_for, resolve_cache_path
from diffsample.guidance.jeffrey.twist import TDS, TwistedDenoiser

VARIANTS = ("score", "conditional")
DEFAULT_MARGINAL_SAMPLES = 1000


@dataclass(frozen=True)
class JeffreyGuidance:
    r"""Jeffrey marginal guidance (arXiv 2606.13240).

    Target ``q(x, y) = p(x | y) p*(y) = p(x, y) w(y)`` with ``w = p* / p_theta``. Diffusing ``q``
    gives the exact guided score

    ``grad log q_t(x_t) = grad log p_t(x_t) + grad log sum_y p_t(y | x_t) w(y)
                       = grad log p_t(x_t) + sum_y q_t(y | x_t) grad log p_t(y | x_t)``,

    with ``q_t(y | x_t) ∝ p_t(y | x_t) w(y)``; returned as ``denoised + scale sigma^2 / alpha
    grad log G_t``. A point-mass target is classifier guidance; ``p* = p_theta`` is no guidance.

    Args:
        target: ``(K,)`` target marginal ``p*(y)`` (see :func:`.class_marginal.parse_target`).
        model_marginal: ``(K,)`` marginal ``p_theta(y)`` of the *guided branch* under the same
            sampler; ``None`` until set with :meth:`with_model_marginal` or :meth:`prepare`
            (calling the wrapped denoiser before raises). :func:`diffsample.generate` (and
            ``diffsample generate``) calls :meth:`prepare`, which fills a missing one: estimated
            from ``marginal_samples`` unguided samples of the run's sampler and cached in
            ``marginal_cache`` (:func:`.model_marginal.model_marginal_for`); by hand, estimate it
            with :func:`.class_marginal.estimate_marginal`. For the ``"conditional"`` variant this
            is the class prior ``p(y)`` implicit in the classifier (``p_t(x | y) ∝ p_t(y | x) /
            p(y)``; :func:`.class_marginal.classifier_prior`), since the class-conditional model
            already carries ``p(x | y)``.
        classifier: noise-aware ``(x_t, t) -> logits (B, K)`` (``estimator="noisy"``, default).
        clean_classifier: ``x0 -> logits`` on the Tweedie estimate (``estimator="tweedie"``, the
            plug-in ``p(y | D(x_t))``; one VJP through the denoiser per call; biased).
        variant: ``"score"`` (classifier-gradient correction above) or ``"conditional"``: for a
            class-conditional model, ``denoised = sum_y q_t(y | x_t) D(x_t, t, y)`` (exact
            identity ``grad log q_t = sum_y q_t(y|x_t) grad log p_t(x_t | y)``), one model row per
            class with weight above ``prune``; the weights come from the noise-aware classifier.
        scale: multiplies the correction (1 = exact; other values temper the target).
        base: branch of a conditional model that is reweighted (``"unconditional"`` = ``cond.negative``).
        label_key: the model keyword carrying class labels (``"conditional"`` variant).
        prune: drop classes with ``q_t(y | x_t) <= prune`` in the conditional variant (then renormalise).
        log_w_clip: optional clip of finite ``log w`` to ``[-c, c]``.
        tds: :class:`~.twist.TDS` settings to run twisted SMC (arXiv 2306.17775):
            ``particles`` chains per output, proposal = this term's guided denoiser,
            twist ``G_t`` from the estimator, final weight the potential ``G(x_0)``; asymptotically
            exact in the number of particles even with a biased estimator (the Tweedie plug-in or a
            weak noise-aware classifier). Needs a stochastic solver and ``variant="score"``;
            ``scale`` then shapes only the proposal. ``None``: one plain guided chain.
        marginal_samples: unguided samples (noise draws for ``variant="conditional"``) of the
            estimate :meth:`prepare` makes when ``model_marginal`` is ``None`` (>= 1).
        marginal_cache: JSON cache of estimated model marginals; ``None``: the default
            (``$DIFFSAMPLE_CACHE_DIR/marginals.json``, else ``~/.cache/diffsample/marginals.json``;
            :func:`.model_marginal.default_cache_path`); ``""`` or ``"none"``: no cache.

    Raises:
        ValueError: shapes of target / model marginal differ; a model marginal estimated as 0
            (:func:`.class_marginal.log_weights`); unknown estimator / variant / base; the
            classifier the estimator needs is missing; ``marginal_samples`` not an integer >= 1;
            an explicit ``marginal_cache`` that cannot be written (a directory, under a file, no
            permission); at call time, no model marginal, or a classifier whose number of
            classes differs from the target's.
    """

    calls_model_branches: ClassVar[bool] = True  # picks the model's branches itself

    target: Tensor
    model_marginal: Tensor | None = None
    classifier: Any = None
    clean_classifier: Any = None
    estimator: str = "noisy"
    variant: str = "score"
    scale: float = 1.0
    base: str = "unconditional"
    label_key: str = "class_labels"
    prune: float = 0.0
    log_w_clip: float | None = None
    tds: TDS | None = None
    marginal_samples: int = DEFAULT_MARGINAL_SAMPLES
    marginal_cache: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        check_count("marginal_samples", self.marginal_samples, 1)
        resolve_cache_path(self.marginal_cache)  # an unusable explicit path is bad input, found before sampling
        check_choice(self.estimator, ESTIMATORS, "Jeffrey estimator")
        check_choice(self.variant, VARIANTS, "Jeffrey variant")
        check_choice(self.base, BASES, "Jeffrey base")
        if (self.estimator == "noisy" or self.variant == "conditional") and self.classifier is None:
            raise ValueError("Jeffrey guidance needs a noise-aware classifier (x_t, t) -> logits "
                             f"(estimator={self.estimator!r}, variant={self.variant!r}); "
                             "or use estimator='tweedie' with a clean classifier")
        if self.estimator == "tweedie" and self.variant == "score" and self.clean_classifier is None:
            raise ValueError("Jeffrey guidance with estimator='tweedie' needs a clean classifier x0 -> logits")
        if not self.scale >= 0:
            raise ValueError(f"Jeffrey scale must be >= 0, got {self.scale}")
        if self.tds is not None and self.variant != "score":
            raise ValueError(f"Jeffrey twisted SMC (particles > 1) needs variant='score', got variant={self.variant!r}")
        object.__setattr__(self, "target", torch.as_tensor(self.target, dtype=torch.float64))
        if self.model_marginal is not None:
            object.__setattr__(self, "model_marginal", torch.as_tensor(self.model_marginal, dtype=torch.float64))
            self.log_weights()  # validate now

    def log_weights(self) -> Tensor:
        """``log w = log p* - log p_theta`` (``-inf`` where ``p* = 0``), shape ``(K,)``.

        Raises:
            ValueError: no model marginal yet, or one estimated as zero somewhere.
        """
        if self.model_marginal is None:
            raise ValueError("Jeffrey guidance needs the model marginal p_theta(y) of the unguided sampler: "
                             "estimate it (JeffreyGuidance.prepare, which diffsample.generate calls for you, "
                             "or diffsample.guidance.jeffrey.class_marginal.estimate_marginal) "
                             "and pass model_marginal=... or call with_model_marginal(...)")
        return log_weights(self.target, self.model_marginal, self.log_w_clip)

    def with_model_marginal(self, model_marginal: Tensor) -> "JeffreyGuidance":
        """A copy using ``model_marginal`` ``(K,)`` as ``p_theta``."""
        return replace(self, model_marginal=torch.as_tensor(model_marginal, dtype=torch.float64))

    def prepare(self, context: PrepareContext) -> "JeffreyGuidance":
        """The term with its model marginal (:class:`~diffsample.guidance.term.Preparable`): a
        given ``model_marginal`` is kept; a missing one comes from the cache or is estimated with
        ``marginal_samples`` unguided samples of the run's sampler on ``context.denoiser`` (seeds
        ``10**9, 10**9 + 1, ...``; :func:`.model_marginal.model_marginal_for`). Reports
        ``{"model_marginal": ...}`` (:meth:`.model_marginal.ModelMarginal.to_record`: ``probs``,
        ``n``, ``source`` = ``"estimated"`` / ``"cache"`` / ``"given"``, cache key and path, the
        ``model_evals`` spent, which a run's own ``model_evals`` does not include).

        Raises:
            ValueError: as :func:`.model_marginal.model_marginal_for`; an estimated marginal that
                is zero on a class the target gives mass to (:func:`.class_marginal.log_weights`).
        """
        if self.model_marginal is not None:
            context.report({"model_marginal": ModelMarginal.given(self.model_marginal).to_record()})
            return self
        found = model_marginal_for(self, context, n=self.marginal_samples, cache=self.marginal_cache)
        context.report({"model_marginal": found.to_record()})
        return self.with_model_marginal(found.estimate.probs)

    def recalibrated(self, achieved: Tensor) -> "JeffreyGuidance":
        """One recalibration round (iterative proportional fitting):
        ``w <- w p* / p_guided`` where ``achieved = p_guided`` ``(K,)`` was measured on samples of
        this term, i.e. ``p_theta <- p_theta p_guided / p*`` on the target's support.

        Raises:
            ValueError: ``achieved`` is zero on a class the target gives mass to.
        """
        achieved = torch.as_tensor(achieved, dtype=torch.float64)
        support = self.target > 0
        if bool((achieved[support] <= 0).any()):
            k = int(((achieved <= 0) & support).nonzero()[0])
            raise ValueError(f"recalibration: guided samples never reached class {k} (target {float(self.target[k]):.4g})")
        base = self.model_marginal if self.model_marginal is not None else self.target
        new = torch.where(support, base * achieved / self.target.clamp_min(1e-300), base)
        return self.with_model_marginal(new)

    def log_g(self, logits: Tensor) -> Tensor:
        """``log G = logsumexp_y(log_softmax(logits)_y + log w_y)``, shape ``(B,)``."""
        lw = self.log_weights().to(device=logits.device, dtype=logits.dtype)
        if logits.shape[1] != lw.numel():
            raise ValueError(f"classifier gives {logits.shape[1]} classes, the target marginal has {lw.numel()}")
        return torch.logsumexp(torch.log_softmax(logits, dim=1) + lw, dim=1)

    def posterior(self, logits: Tensor) -> Tensor:
        """``q_t(y | x_t) ∝ p_t(y | x_t) w(y)``, shape ``(B, K)``."""
        lw = self.log_weights().to(device=logits.device, dtype=logits.dtype)
        return torch.softmax(torch.log_softmax(logits, dim=1) + lw, dim=1)

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        if self.tds is not None:
            return TwistedDenoiser(denoiser, self)
        return _JeffreyDenoiser(denoiser, self)


class _JeffreyDenoiser(GuidedDenoiser):
    def correction(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """``grad_x log G_t(x_t)`` (score units), shape of ``x``."""
        term = self.term
        _, grad = guided_denoised(self.inner, x, t, base_cond(cond, term.base), term.log_g,
                                  estimator=term.estimator, classifier=term.classifier,
                                  clean_classifier=term.clean_classifier, scale=term.scale)
        return grad

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        term = self.term
        if term.variant == "conditional":
            return self._conditional(x, t, cond)
        out, _ = guided_denoised(self.inner, x, t, base_cond(cond, term.base), term.log_g,
                                 estimator=term.estimator, classifier=term.classifier,
                                 clean_classifier=term.clean_classifier, scale=term.scale)
        return out

    def _conditional(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        term = self.term
        with torch.no_grad():
            logits = term.classifier(x, t)
            q = term.posterior(logits.to(torch.float64) if x.dtype == torch.float64 else logits)
        keep = q > term.prune
        q = torch.where(keep, q, torch.zeros_like(q))
        q = q / q.sum(1, keepdim=True)
        rows, classes = keep.nonzero(as_tuple=True)
        extra = {k: v for k, v in (cond.positive.items() if cond is not None else ()) if k != term.label_key}
        b = x.shape[0]
        extra = {k: (v[rows] if isinstance(v, Tensor) and v.ndim and v.shape[0] == b else v) for k, v in extra.items()}
        tt = torch.as_tensor(t)
        t_rows = tt[rows] if tt.ndim else tt
        d = self.inner(x[rows], t_rows, Cond({**extra, term.label_key: classes.to(x.device)}))
        w = q[rows, classes].to(d.dtype)[(...,) + (None,) * (x.ndim - 1)]
        out = torch.zeros_like(x)
        out.index_add_(0, rows.to(x.device), w * d)
        if term.scale != 1.0:  # temper: interpolate the data prediction of the base branch
            with torch.no_grad():
                d0 = self.inner(x, t, base_cond(cond, term.base))
            out = d0 + term.scale * (out - d0)
        return out


