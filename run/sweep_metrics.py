"""Metrics a sweep scores its cells with: a name (the ``--metric`` value) -> a scorer.

* a testbed metric (:data:`diffsample.testbed.METRICS`, e.g. ``mnist-fd``: Fréchet distance in the
  bundled MNIST classifier's features, plus class accuracy) -- only on the models it fits
  (``LoadedModel.metrics``);
* ``none`` -- nothing is scored; tables show wall time;
* ``reward:SPEC`` -- the mean (and standard deviation) of a reward of
  :data:`diffsample.guidance.rewards.REWARDS` over the cell's decoded images mapped to [-1, 1],
  e.g. ``reward:ink`` or ``reward:class_logp:classifier=clean``;
* ``clip-score`` -- 100 cos(CLIP image, CLIP text) of each image against its own prompt, with a
  CLIP model from a local folder (``clip_weights``, a transformers ``CLIPModel`` saved with
  safetensors; arXiv 2104.08718). Nothing is ever downloaded.

Every scorer is built (and its files checked) before the first cell runs, so a bad metric writes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diffsample.testbed import METRICS as TESTBED_METRICS

NO_METRIC, REWARD_PREFIX, CLIP_SCORE = "none", "reward:", "clip-score"
METRICS = (*TESTBED_METRICS, NO_METRIC)
"""Plain metric names; ``reward:SPEC`` and ``clip-score`` are accepted too (:func:`build_metric`)."""
METRIC_FORMS = (*METRICS, "reward:SPEC", CLIP_SCORE)
"""What ``--metric`` accepts, for messages."""


def row_metric(row: dict[str, Any]) -> str:
    """The metric a row was scored with: its ``metric`` field, or (rows written before that field
    existed) the testbed metric whose headline score it holds, else ``"none"``."""
    if isinstance(row.get("metric"), str):
        return row["metric"]
    return next((name for name, m in TESTBED_METRICS.items() if m.headline in row), NO_METRIC)


def headline(metric: str) -> str:
    """The row key tables and plots show for ``metric``: the testbed metric's headline score,
    ``reward_mean``, ``clip_score``, or ``wall_time_s`` for ``"none"``."""
    if metric in TESTBED_METRICS:
        return TESTBED_METRICS[metric].headline
    if metric.startswith(REWARD_PREFIX):
        return "reward_mean"
    if metric == CLIP_SCORE:
        return "clip_score"
    return "wall_time_s"


def lower_is_better(metric: str) -> bool:
    """Whether a smaller headline value is better (distances, wall time) or a larger one (rewards,
    CLIP score)."""
    return not (metric.startswith(REWARD_PREFIX) or metric == CLIP_SCORE)


def known_metric(metric: Any) -> bool:
    """Whether ``metric`` is a form :func:`build_metric` accepts (without building it)."""
    return isinstance(metric, str) and (metric in METRICS or metric == CLIP_SCORE
                                        or (metric.startswith(REWARD_PREFIX) and len(metric) > len(REWARD_PREFIX)))


Scorer = Callable[[Any, Any, "Sequence[int] | None", "Sequence[str] | None"], dict[str, float]]
"""``score(samples, images, classes, prompts) -> {key: value}``: ``samples`` in model space,
``images`` ``(N, C, H, W)`` in [0, 1], ``classes`` per-sample labels or ``None``, ``prompts``
per-sample prompts (pipeline folders) or ``None``."""


@dataclass(frozen=True)
class SweepMetric:
    """A metric ready to score cells.

    Attributes:
        name: the ``--metric`` value, stored in every row.
        score: the :data:`Scorer`.
    """

    name: str
    score: Scorer


def build_metric(metric: str, model: Any, *, clip_weights: str | None = None) -> SweepMetric:
    """The scorer of ``metric`` for ``model`` (a ``LoadedModel`` or ``PipelineModel``).

    Raises:
        ValueError: unknown metric (listing the valid forms); a testbed metric on a model it does
            not fit; a reward spec that does not resolve; ``clip-score`` without ``clip_weights`` or
            with a folder that is not a local CLIP model; ``clip-score`` on a model without prompts.
    """
    if not known_metric(metric):
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRIC_FORMS)}")
    if metric == NO_METRIC:
        return SweepMetric(metric, lambda samples, images, classes, prompts: {})
    if metric in TESTBED_METRICS:
        if metric not in getattr(model, "metrics", ()):
            raise ValueError(f"metric {metric!r} needs {TESTBED_METRICS[metric].needs}; use --metric none, "
                             f"reward:SPEC or {CLIP_SCORE} for model {model.name!r}")
        testbed = TESTBED_METRICS[metric]
        return SweepMetric(metric, lambda samples, images, classes, prompts: testbed.score(samples, classes))
    if metric.startswith(REWARD_PREFIX):
        return SweepMetric(metric, _reward_scorer(metric[len(REWARD_PREFIX):], model))
    return SweepMetric(metric, _clip_scorer(model, clip_weights))


def _reward_scorer(spec: str, model: Any) -> Scorer:
    import torch

    from diffsample.guidance.rewards import reward_from_spec
    from diffsample.guidance.term import Resources

    reward = reward_from_spec(spec, getattr(model, "resources", None) or Resources())

    def score(samples, images, classes, prompts) -> dict[str, float]:
        x0 = images.to(torch.float32) * 2 - 1
        cond = model.cond(torch.as_tensor(classes)) if classes is not None and hasattr(model, "cond") else None
        with torch.no_grad():
            values = torch.cat([reward(x0[i:i + 256], _slice_cond(cond, i, i + 256)) for i in range(0, len(x0), 256)])
        values = values.to(torch.float64)
        return {"reward_mean": float(values.mean()),
                "reward_std": float(values.std()) if len(values) > 1 else 0.0}

    return score


def _slice_cond(cond: Any, lo: int, hi: int) -> Any:
    if cond is None:
        return None
    from diffsample.guidance.term import Cond

    def cut(kwargs):
        return None if kwargs is None else {k: (v[lo:hi] if hasattr(v, "__getitem__") and hasattr(v, "shape") else v)
                                            for k, v in kwargs.items()}

    return Cond(cut(cond.positive), cut(cond.negative))


def _clip_scorer(model: Any, clip_weights: str | None) -> Scorer:
    import torch

    from diffsample.guidance.rewards import ClipScore

    if clip_weights is None:
        raise ValueError(f"metric {CLIP_SCORE!r} needs a local CLIP model folder: give --clip-weights FOLDER "
                         "(nothing is downloaded)")
    ClipScore(clip_weights, "")  # checks the folder now, before any cell runs
    cache: dict[str, Any] = {}

    def score(samples, images, classes, prompts) -> dict[str, float]:
        if prompts is None:
            raise ValueError(f"metric {CLIP_SCORE!r} needs prompts; model {model.name!r} has none")
        values = []
        x0 = images.to(torch.float32) * 2 - 1
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                if prompt not in cache:
                    cache[prompt] = ClipScore(clip_weights, prompt)
                values.append(float(cache[prompt](x0[i:i + 1])[0]))
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        return {"clip_score": mean, "clip_score_std": std}

    return score
