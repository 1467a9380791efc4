"""Jeffrey guidance with an embedding target (arXiv 2606.13240;
docs/methods/jeffrey.md#embedding-targets-jeffrey_embedding): a linear logistic *ratio classifier* on feature embeddings, and the Tweedie plug-in guidance term
``scale * grad_{x_t} log w(f(D(x_t)))``.

The target is given as a set of samples (e.g. real images), not as a class marginal. With
``y = f(x0)`` a deterministic embedding, Jeffrey's rule gives ``q(x0) = p_theta(x0) w(f(x0))`` with
``w = p*(e) / p_theta(e)``; ``w`` is estimated directly as a density ratio by a probabilistic
classifier ``c(e) = P(target | e)`` trained on target embeddings (label 1) against embeddings of
unguided model samples (label 0): ``log w(e) = logit c(e)`` (balanced classes).
"""

from __future__ import annotations

from typing import ClassVar

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffsample.core.accounting import add_event

from diffsample.guidance._common import GuidedDenoiser, alpha_sigma, row_norm
from diffsample.guidance.term import Cond, Denoiser, Guidance, Resources
from diffsample.guidance.classifier import BASES, base_cond, check_choice, guided_denoised
from diffsample.guidance.interval import within

FORMAT = "diffsample.RatioClassifier"
"""``format`` metadata entry of a saved ratio classifier (safetensors)."""
KEYS = ("mean", "std", "weight", "bias")

Features = Callable[[Tensor], Tensor]
"""``x0 (B, *dims) -> embeddings (B, d)``, differentiable (guidance backpropagates through it)."""


def _embeddings(e: Any, name: str, dim: int | None = None) -> Tensor:
    """``e`` as a float64 ``(n, d)`` tensor; raises ``ValueError`` naming ``name`` on bad input."""
    if not isinstance(e, Tensor):
        raise ValueError(f"{name} must be a tensor of shape (n, d), got {type(e).__name__}")
    if e.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(e.shape)}")
    if e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(e.shape)})")
    if dim is not None and e.shape[1] != dim:
        raise ValueError(f"{name} has {e.shape[1]} features, expected {dim}")
    e = e.detach().to(torch.float64)
    if not bool(torch.isfinite(e).all()):
        bad = int((~torch.isfinite(e)).any(1).sum())
        raise ValueError(f"{name} contains NaN or inf ({bad} of {e.shape[0]} rows)")
    return e


def _newton_logistic(z: Tensor, y: Tensor, c: Tensor, l2: float, max_iter: int, tol: float) -> tuple[Tensor, bool]:
    """Minimise ``sum_i c_i (softplus(s_i) - y_i s_i) + l2/2 ||theta[:-1]||^2``, ``s = z theta``
    (the last column of ``z`` is the bias, not penalised), by Newton's method with backtracking.
    Returns ``(theta, converged)``."""
    d1 = z.shape[1]
    penalty = torch.full((d1,), float(l2), dtype=z.dtype)
    penalty[-1] = 0.0
    theta = torch.zeros(d1, dtype=z.dtype)

    def loss(th: Tensor) -> Tensor:
        s = z @ th
        return (c * (F.softplus(s) - y * s)).sum() + 0.5 * (penalty * th * th).sum()

    current = loss(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(z @ theta)
        grad = z.T @ (c * (p - y)) + penalty * theta
        if float(grad.abs().max()) < tol:
            return theta, True
        hess = z.T @ (z * (c * p * (1 - p))[:, None]) + torch.diag(penalty + 1e-12)
        step = torch.linalg.solve(hess, grad)
        decrease = float(grad @ step)
        lr = 1.0
        while True:  # Armijo backtracking; Newton steps are accepted at lr = 1 near the optimum
            candidate = theta - lr * step
            new = loss(candidate)
            if float(new) <= float(current) - 1e-4 * lr * decrease or lr < 1e-10:
                break
            lr *= 0.5
        if lr < 1e-10:  # no further progress possible in float64
            return theta, float(grad.abs().max()) < 1e3 * tol
        theta, current = candidate, new
    p = torch.sigmoid(z @ theta)
    grad = z.T @ (c * (p - y)) + penalty * theta
    return theta, float(grad.abs().max()) < tol


@dataclass(frozen=True, eq=False)
class RatioClassifier:
    r"""Linear logistic density-ratio classifier on standardized embeddings
    (docs/methods/jeffrey.md#embedding-targets-jeffrey_embedding).

    ``log_ratio(e) = weight . (e - mean) / std + bias`` estimates ``log p*(e) / p_theta(e)``: the
    logit of ``c(e) = P(target | e)`` fitted with *balanced* classes (each class has total weight
    1/2 in the loss), so no ``log(n0 / n1)`` prior correction is needed, whatever the set sizes.
    The ratio is exact when the true log ratio is linear in ``e`` (e.g. two Gaussians with equal
    covariance); otherwise it is the best linear-logistic approximation.

    Args:
        mean: ``(d,)`` standardization mean (pooled over both sets at fit time).
        std: ``(d,)`` standardization std, ``> 0`` (features constant on the fit data get 1).
        weight: ``(d,)`` weights on the standardized embeddings.
        bias: scalar (shape ``()`` or ``(1,)``) intercept.

    All four are stored as float64 CPU tensors; :meth:`log_ratio` casts them to the input's dtype
    and device.

    Raises:
        ValueError: shapes that do not match (``mean``, ``std``, ``weight`` of one length ``d``,
            a scalar ``bias``), non-finite values, or ``std <= 0``.
    """

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def __post_init__(self) -> None:
        vals = {k: torch.as_tensor(getattr(self, k)).detach().to("cpu", torch.float64) for k in KEYS}
        if vals["mean"].ndim != 1 or vals["mean"].numel() == 0:
            raise ValueError(f"ratio classifier: mean must have shape (d,) with d >= 1, got {tuple(vals['mean'].shape)}")
        d = vals["mean"].numel()
        for k in ("std", "weight"):
            if tuple(vals[k].shape) != (d,):
                raise ValueError(f"ratio classifier: {k} must have shape ({d},) like mean, got {tuple(vals[k].shape)}")
        if vals["bias"].numel() != 1 or vals["bias"].ndim > 1:
            raise ValueError(f"ratio classifier: bias must be a scalar (shape () or (1,)), got {tuple(vals['bias'].shape)}")
        vals["bias"] = vals["bias"].reshape(())
        for k, v in vals.items():
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"ratio classifier: {k} contains NaN or inf")
        if not bool((vals["std"] > 0).all()):
            raise ValueError("ratio classifier: std must be > 0 everywhere")
        for k, v in vals.items():
            object.__setattr__(self, k, v)

    @property
    def dim(self) -> int:
        """Embedding dimension ``d``."""
        return self.mean.numel()

    @classmethod
    def fit(cls, e_target: Tensor, e_model: Tensor, l2: float = 1e-3, max_iter: int = 100,
            tol: float = 1e-9) -> "RatioClassifier":
        """Fit ``c(e) = P(target | e)`` by L2-penalised logistic regression (Newton's method,
        float64; no sklearn).

        The loss is ``1/2 mean_target softplus(-s) + 1/2 mean_model softplus(s) + l2/2 ||weight||^2``
        with ``s`` the logit on standardized embeddings (the bias is not penalised). Cost: one
        ``(d+1) x (d+1)`` solve per iteration and memory ``O((n1 + n0) d)``.

        Args:
            e_target: ``(n1, d)`` embeddings of the target set (label 1).
            e_model: ``(n0, d)`` embeddings of unguided model samples (label 0).
            l2: ridge penalty on the standardized weights (``>= 0``; 0 may diverge on separable data).
            max_iter: Newton iterations (``>= 1``); a warning is issued if the gradient has not
                reached ``tol`` by then.
            tol: convergence threshold on the max-abs gradient.

        Returns:
            The fitted classifier.

        Raises:
            ValueError: an empty, non-2-D or non-finite embedding set, differing feature
                dimensions, ``l2 < 0`` or ``max_iter < 1``.
        """
        e1 = _embeddings(e_target, "e_target")
        e0 = _embeddings(e_model, "e_model")
        if e1.shape[1] != e0.shape[1]:
            raise ValueError(f"e_target has {e1.shape[1]} features but e_model has {e0.shape[1]}")
        if not (l2 >= 0 and math.isfinite(l2)):
            raise ValueError(f"ratio classifier: l2 must be a finite number >= 0, got {l2}")
        if int(max_iter) < 1:
            raise ValueError(f"ratio classifier: max_iter must be >= 1, got {max_iter}")
        e = torch.cat([e1, e0])
        mean = e.mean(0)
        std = e.std(0, unbiased=False)
        std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
        z = torch.cat([(e - mean) / std, torch.ones(e.shape[0], 1, dtype=e.dtype)], dim=1)
        n1, n0 = e1.shape[0], e0.shape[0]
        y = torch.cat([torch.ones(n1, dtype=e.dtype), torch.zeros(n0, dtype=e.dtype)])
        c = torch.cat([torch.full((n1,), 0.5 / n1, dtype=e.dtype), torch.full((n0,), 0.5 / n0, dtype=e.dtype)])
        theta, converged = _newton_logistic(z, y, c, float(l2), int(max_iter), float(tol))
        if not converged:
            warnings.warn(f"ratio classifier: Newton did not converge in {max_iter} iterations "
                          "(raise max_iter or l2)", RuntimeWarning, stacklevel=2)
        return cls(mean, std, theta[:-1], theta[-1])

    def log_ratio(self, e: Tensor) -> Tensor:
        """``log p*(e) / p_theta(e)`` (the classifier logit), shape ``(B,)``, differentiable in ``e``.

        Args:
            e: ``(B, d)`` embeddings (any float dtype / device; the result has the same).

        Raises:
            ValueError: ``e`` is not ``(B, d)``.
        """
        if not isinstance(e, Tensor) or e.ndim != 2 or e.shape[1] != self.dim:
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"ratio classifier: embeddings must have shape (B, {self.dim}), got {shape}")
        p = {k: getattr(self, k).to(device=e.device, dtype=e.dtype) for k in KEYS}
        return ((e - p["mean"]) / p["std"]) @ p["weight"] + p["bias"]

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the four tensors (float64) to a safetensors file (never pickle).

        Args:
            path: output file (conventionally ``*.safetensors``); parent folders are created.
            metadata: extra string entries stored in the file header (e.g. how it was fitted).

        Returns:
            The path written.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).reshape(-1).contiguous() if k == "bias" else getattr(self, k).contiguous()
                   for k in KEYS}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        save_file(tensors, str(path), metadata={**meta, "format": FORMAT, "dim": str(self.dim)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RatioClassifier":
        """Read a classifier written by :meth:`save` (safetensors only).

        Raises:
            ValueError: the file is missing, is not a safetensors file (pickle checkpoints are
                refused), lacks one of ``mean``, ``std``, ``weight``, ``bias`` or has extra
                tensors, or its shapes / values are inconsistent (see the class docstring).
        """
        from safetensors import safe_open

        from diffsample.core.files import regular_file

        path = Path(path)
        try:
            regular_file(path, "ratio classifier file", 1 << 30)  # no FIFO / device / directory, 1 GiB at most
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys & set(KEYS)}
        except Exception as exc:  # safetensors raises its own error type for malformed headers
            raise ValueError(f"ratio classifier file {str(path)!r} is not a readable safetensors file "
                             f"(pickle checkpoints are refused): {exc}") from None
        missing, extra = set(KEYS) - keys, keys - set(KEYS)
        if missing or extra:
            raise ValueError(f"ratio classifier file {str(path)!r}: expected tensors {', '.join(KEYS)}; "
                             + (f"missing {sorted(missing)}" if missing else "")
                             + ("; " if missing and extra else "")
                             + (f"unexpected {sorted(extra)}" if extra else ""))
        try:
            return cls(**tensors)
        except ValueError as exc:
            raise ValueError(f"ratio classifier file {str(path)!r}: {exc}") from None


@dataclass(frozen=True)
class JeffreyEmbedding:
    r"""Jeffrey guidance towards a target *set* in an embedding space, Tweedie plug-in
    (arXiv 2606.13240; docs/methods/jeffrey.md#embedding-targets-jeffrey_embedding):

    ``grad log q_t(x_t) ~ grad log p_t(x_t) + scale * grad_{x_t} log w(f(D(x_t)))``,

    returned as the data prediction ``D + scale sigma^2 / alpha * g`` with
    ``g = grad_{x_t} clip(log_ratio(f(D(x_t))), +-logit_clip)`` (the same form as classifier
    guidance with ``estimator="tweedie"``, :func:`.classifier.guided_denoised`). ``log w`` is a
    :class:`RatioClassifier` fitted between ``f`` of the target set and ``f`` of unguided samples
    *of the guided branch under the same sampler* (``p_theta`` is the model's own marginal).

    Exact when ``log w`` is linear in ``x0`` and ``p_theta`` is Gaussian (then
    ``E[w(x0) | x_t] ∝ w(D(x_t))``); in general biased (it under-corrects on mixtures, like the
    class plug-in). The thesis behind the defaults (github.com/Sausi9/thesis,
    not the paper's code) guides only the last 2% of the trajectory, clips the logit to +-20 and
    the gradient norm at 100; restrict the window with :func:`.interval.within` (VE sigma).

    Cost per call: 1 NFE plus one VJP through the denoiser (``model_evals`` 3 per row: a backward
    counts 2, docs/design.md#nfe-and-model_evals), plus one forward and backward of ``features`` (not in ``model_evals``).

    Args:
        ratio: the fitted :class:`RatioClassifier` (``d`` features).
        features: ``x0 (B, *dims) -> (B, d)``, differentiable, on the denoiser's device.
        scale: guidance scale ``gamma`` (1 = the plug-in for the exact Jeffrey target).
        grad_clip: optional cap on the per-sample L2 norm of ``g`` (score units, before ``scale``);
            rows that hit it are counted in the run event ``"jeffrey_embedding_grad_clip"``.
        logit_clip: optional clip of ``log w`` to ``[-c, c]`` (default 20, the thesis's); rows
            beyond it (zero gradient) are counted in the event ``"jeffrey_embedding_logit_clip"``.
        base: branch of a conditional model that is guided (``"unconditional"`` = ``cond.negative``
            when present, as for :class:`~.jeffrey.JeffreyGuidance`; ``"conditional"`` = ``cond.positive``).

    Raises:
        ValueError: ``ratio`` is not a :class:`RatioClassifier`, ``features`` is not callable,
            ``scale < 0`` or non-finite, ``grad_clip`` / ``logit_clip`` not ``> 0``, unknown
            ``base``; at call time, ``features`` returning anything but a ``(B, d)`` tensor.
    """

    calls_model_branches: ClassVar[bool] = True  # picks the model's branches itself

    ratio: RatioClassifier
    features: Features
    scale: float = 1.0
    grad_clip: float | None = None
    logit_clip: float | None = 20.0
    base: str = "unconditional"
    name: str = field(default="jeffrey_embedding", repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, RatioClassifier):
            raise ValueError(f"{self.name}: ratio must be a RatioClassifier, got {type(self.ratio).__name__}")
        if not callable(self.features):
            raise ValueError(f"{self.name}: features must be a callable x0 -> (B, d), got {type(self.features).__name__}")
        if not 0.0 <= self.scale < math.inf:
            raise ValueError(f"{self.name}: scale must be a finite number >= 0, got {self.scale}")
        for key in ("grad_clip", "logit_clip"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"{self.name}: {key} must be > 0 or None, got {v}")
        check_choice(self.base, BASES, f"{self.name} base")

    def embed(self, x0: Tensor) -> Tensor:
        """``features(x0)``, checked to be ``(B, d)``.

        Raises:
            ValueError: ``features`` returned something else.
        """
        e = self.features(x0)
        if not isinstance(e, Tensor) or tuple(e.shape) != (x0.shape[0], self.ratio.dim):
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"{self.name}: features(x0) must return shape (B, d) = ({x0.shape[0]}, {self.ratio.dim}) "
                             f"for x0 of shape {tuple(x0.shape)}, got {shape}")
        return e

    def log_w(self, e: Tensor) -> Tensor:
        """``clip(log_ratio(e), -logit_clip, logit_clip)``, shape ``(B,)``."""
        lr = self.ratio.log_ratio(e)
        if self.logit_clip is None:
            return lr
        over = int((lr.detach().abs() > self.logit_clip).sum())
        if over:
            add_event("jeffrey_embedding_logit_clip", over)
        return lr.clamp(-self.logit_clip, self.logit_clip)

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return _JeffreyEmbeddingDenoiser(denoiser, self)


class _JeffreyEmbeddingDenoiser(GuidedDenoiser):
    def _guided(self, x: Tensor, t: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor]:
        term = self.term
        out, grad = guided_denoised(self.inner, x, t, base_cond(cond, term.base), term.log_w, estimator="tweedie",
                                    classifier=None, clean_classifier=term.embed, scale=term.scale)
        if term.grad_clip is not None:
            norm = row_norm(grad)
            hit = norm > term.grad_clip
            if bool(hit.any()):
                add_event("jeffrey_embedding_grad_clip", int(hit.sum()))
                clipped = torch.where(hit, grad * (term.grad_clip / norm.clamp_min(1e-300)), grad)
                a, s = alpha_sigma(self.noise_schedule, t, x)
                out = out + term.scale * (s**2 / a) * (clipped - grad)
                grad = clipped
        return out, grad

    def correction(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """``g = grad_{x_t} log w(f(D(x_t)))`` after the optional norm clip (score units), shape of ``x``."""
        return self._guided(x, t, cond)[1]

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if self.term.scale == 0.0:
            return self.inner(x, t, base_cond(cond, self.term.base))
        return self._guided(x, t, cond)[0]


def feature_map(resources: Resources) -> tuple[Features, int | None]:
    """The embedding network a model offers: ``resources.features`` if that field exists and is set,
    else the ``.features`` method of ``resources.clean_classifier`` (the bundled MNIST
    :class:`~diffsample.testbed.mnist.networks.DigitClassifier`: its 64-d penultimate layer, the
    MNIST-FD features). Returns ``(features, d or None)`` (``d`` from a ``num_features`` attribute).

    Raises:
        ValueError: neither is available.
    """
    owner = getattr(resources, "features", None)
    features = owner
    if features is None:
        owner = resources.clean_classifier
        features = getattr(owner, "features", None)
    if not callable(features):
        raise ValueError("guidance 'jeffrey_embedding' needs a feature network x0 -> (B, d): Resources.features, "
                         "or a clean classifier with a .features method (Resources.clean_classifier); "
                         "the model provides neither")
    dim = getattr(owner, "num_features", None)
    if dim is None:  # a bound method such as DigitClassifier.features: ask its module
        dim = getattr(getattr(features, "__self__", None), "num_features", None)
    return features, (int(dim) if isinstance(dim, int) else None)


def jeffrey_embedding_factory(resources: Resources, ratio=None, scale: float = 1.0, sigma_lo: float = 0.0,
                              sigma_hi: float = math.inf, grad_clip=None, logit_clip=20.0) -> Guidance:
    """Registry factory: ``jeffrey_embedding:ratio=FILE.safetensors[,scale=..,sigma_lo=..,sigma_hi=..,
    grad_clip=..,logit_clip=..]`` (features from :func:`feature_map`; ``logit_clip=None`` disables)."""
    if ratio is None:
        raise ValueError("guidance 'jeffrey_embedding' needs ratio=FILE.safetensors "
                         "(a RatioClassifier fitted on target vs model embeddings, RatioClassifier.save)")
    clf = RatioClassifier.load(str(ratio))
    features, dim = feature_map(resources)
    if dim is not None and dim != clf.dim:
        raise ValueError(f"guidance 'jeffrey_embedding': the ratio classifier {str(ratio)!r} expects {clf.dim} "
                         f"features, the model's feature network gives {dim}")
    term = JeffreyEmbedding(clf, features, float(scale), None if grad_clip is None else float(grad_clip),
                            None if logit_clip is None else float(logit_clip))
    return within(term, float(sigma_lo), float(sigma_hi), "unconditional")
