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
* ``fid`` -- FID (arXiv 1706.08500): Fréchet distance in the 2048-d pool3 features of the
  2015-12-05 Inception-v3 (:mod:`diffsample.run.fid_inception`, weights from a local safetensors
  file ``fid_weights``) between the cell's images and a reference set: the images of the folder
  ``fid_reference``, or, for the bundled MNIST model, its 1,000 held-out digits. Computed by
  ``torchmetrics``' ``FrechetInceptionDistance`` with that network as its feature module.

Every scorer is built (and its files checked) before the first cell runs, so a bad metric writes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diffsample.testbed import METRICS as TESTBED_METRICS

NO_METRIC, REWARD_PREFIX, CLIP_SCORE, FID = "none", "reward:", "clip-score", "fid"
METRICS = (*TESTBED_METRICS, NO_METRIC)
"""Plain metric names; ``reward:SPEC``, ``clip-score`` and ``fid`` are accepted too (:func:`build_metric`)."""
METRIC_FORMS = (*METRICS, "reward:SPEC", CLIP_SCORE, FID)
"""What ``--metric`` accepts, for messages."""


def row_metric(row: dict[str, Any]) -> str:
    """The metric a row was scored with: its ``metric`` field, or (rows written before that field
    existed) the testbed metric whose headline score it holds, else ``"none"``."""
    if isinstance(row.get("metric"), str):
        return row["metric"]
    return next((name for name, m in TESTBED_METRICS.items() if m.headline in row), NO_METRIC)


def headline(metric: str) -> str:
    """The row key tables and plots show for ``metric``: the testbed metric's headline score,
    ``reward_mean``, ``clip_score``, ``fid``, or ``wall_time_s`` for ``"none"``."""
    if metric in TESTBED_METRICS:
        return TESTBED_METRICS[metric].headline
    if metric.startswith(REWARD_PREFIX):
        return "reward_mean"
    if metric == CLIP_SCORE:
        return "clip_score"
    if metric == FID:
        return "fid"
    return "wall_time_s"


def lower_is_better(metric: str) -> bool:
    """Whether a smaller headline value is better (distances, wall time) or a larger one (rewards,
    CLIP score)."""
    return not (metric.startswith(REWARD_PREFIX) or metric == CLIP_SCORE)


def known_metric(metric: Any) -> bool:
    """Whether ``metric`` is a form :func:`build_metric` accepts (without building it)."""
    return isinstance(metric, str) and (metric in METRICS or metric in (CLIP_SCORE, FID)
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


def build_metric(metric: str, model: Any, *, clip_weights: str | None = None, fid_weights: str | None = None,
                 fid_reference: str | None = None) -> SweepMetric:
    """The scorer of ``metric`` for ``model`` (a ``LoadedModel`` or ``PipelineModel``).

    Raises:
        ValueError: unknown metric (listing the valid forms); a testbed metric on a model it does
            not fit; a reward spec that does not resolve; ``clip-score`` without ``clip_weights`` or
            with a folder that is not a local CLIP model; ``clip-score`` on a model without prompts;
            ``fid`` without ``fid_weights``, with a file that is not the FID Inception network in
            safetensors, or without a usable reference set (fewer than 2 readable images).
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
    if metric == FID:
        return SweepMetric(metric, _fid_scorer(model, fid_weights, fid_reference))
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""The files of an FID reference folder that are read (case-insensitive)."""


def _reference_images(model: Any, fid_reference: str | None) -> list[Any]:
    """The FID reference set as a list of ``(1, C, H, W)`` tensors in [0, 1]."""
    import os

    import torch

    if fid_reference is None:
        if "mnist-fd" not in getattr(model, "metrics", ()):
            raise ValueError(f"metric {FID!r} needs a folder of reference images for model {model.name!r}: "
                             "give --fid-reference FOLDER")
        from diffsample.testbed.mnist.data import load_digits

        digits, _ = load_digits("heldout")
        return list(((digits.to(torch.float32).clamp(-1, 1) + 1) / 2).split(1))
    if not os.path.isdir(fid_reference):
        raise ValueError(f"FID reference {fid_reference!r}: no such folder")
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for name in sorted(os.listdir(fid_reference)):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        try:
            with Image.open(os.path.join(fid_reference, name)) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"FID reference {fid_reference!r}: cannot read {name!r} ({exc})") from None
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1)[None])
    if len(images) < 2:
        raise ValueError(f"FID reference {fid_reference!r} holds {len(images)} image(s) "
                         f"({', '.join(IMAGE_SUFFIXES)}); FID needs at least 2")
    return images


def _fid_scorer(model: Any, fid_weights: str | None, fid_reference: str | None) -> Scorer:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from diffsample.run.fid_inception import load_fid_inception

    if fid_weights is None:
        raise ValueError(f"metric {FID!r} needs the FID Inception weights as a local safetensors file: give "
                         "--fid-weights PATH (nothing is downloaded)")
    net = load_fid_inception(fid_weights)
    reference = _reference_images(model, fid_reference)
    fid = FrechetInceptionDistance(feature=net, reset_real_features=False, sync_on_compute=False)
    with torch.no_grad():  # the reference statistics are computed once, before any cell runs
        for image in reference:
            fid.update(image, real=True)

    def score(samples, images, classes, prompts) -> dict[str, float]:
        if len(images) < 2:
            raise ValueError(f"metric {FID!r} needs at least 2 images per cell, got {len(images)}")
        fid.reset()  # keeps the reference features
        x = images.to(torch.float32).clamp(0, 1)
        with torch.no_grad():
            for i in range(0, len(x), 50):
                fid.update(x[i:i + 50], real=False)
            return {"fid": float(fid.compute()), "fid_reference_n": float(len(reference))}

    return score
