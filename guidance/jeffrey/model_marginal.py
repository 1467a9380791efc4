"""The model marginal ``p_theta(y)`` that Jeffrey guidance divides by, estimated on demand and cached.

Jeffrey guidance reweights the model's own joint by ``w(y) = p*(y) / p_theta(y)`` (arXiv
2606.13240), where ``p_theta(y)`` is the class marginal of the *unguided sampler* on the branch
the term reweights. :func:`model_marginal_for` obtains it, from what the run offers in a
:class:`~diffsample.guidance.term.PrepareContext` (the term's ``prepare`` step calls it):

* ``variant="score"``: ``n`` unguided samples with the run's sampler (solver, step schedule,
  ``steps``, ``final``) on the term's base branch (``base="unconditional"``: the null / negative
  condition of a class-conditional model; an unconditional model as is), each soft-labelled by the
  classifier the term's estimator uses for ``p(y | x0)``: ``estimator="noisy"`` -> the noise-aware
  classifier at the schedule's smallest time ``t_min`` (timestep 0 for a DDPM model);
  ``"tweedie"`` -> the clean classifier on the samples. ``p_theta(y) = (1/n) sum_i p(y | x_i)``.
* ``variant="conditional"``: the class prior implicit in the noise-aware classifier, its mean
  output on pure noise at ``t_max`` (:func:`diffsample.guidance.jeffrey.class_marginal.classifier_prior`); no
  model evaluation.

Seeds: sample ``i`` of an estimate with seed ``s`` uses the per-sample seed
``MARGINAL_SEED_BASE + s + i`` (``MARGINAL_SEED_BASE = 10**9``), so it never shares noise with a
run's own samples (seeds ``0 .. 10**9 - 1``). The term's ``prepare`` uses ``s = 0`` whatever the
run's seed, so every run of one model and sampler shares one estimate.

Cache: a JSON file (default ``$DIFFSAMPLE_CACHE_DIR/marginals.json``, else
``$XDG_CACHE_HOME/diffsample/marginals.json``, else ``~/.cache/diffsample/marginals.json``) maps a
key to an entry readable by :func:`diffsample.guidance.jeffrey.class_marginal.load_marginal`. The key holds
everything that determines the estimate: the model name plus a fingerprint of its weight files
(:func:`model_identity`), dtype, variant, base, estimator, solver, step schedule, ``steps``,
``final``, the guidance terms applied below the Jeffrey term, ``n`` and the seed. The device and the
batch size are not in it (they change the estimate by floating-point noise only, far below its
Monte-Carlo error). Writes are atomic (temporary file + ``os.replace``); a corrupt file is reported
with a warning, recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from diffsample.guidance.classifier import base_cond
from diffsample.guidance.jeffrey.class_marginal import (SUM_TOL, MarginalEstimate, classifier_prior, estimate_marginal,
                                                        save_marginal)
from diffsample.core.files import read_json
from diffsample.guidance.term import PrepareContext

MARGINAL_SEED_BASE = 10**9
"""Per-sample seeds of a marginal estimate start here (disjoint from the seeds users sample with)."""
CACHE_FILE = "marginals.json"
NO_CACHE = ("", "none")
"""Values of ``cache`` (case-insensitive) that turn caching off."""
SOURCES = ("estimated", "cache", "given")
_WHOLE_FILE = 8 << 20  # files up to 8 MiB are hashed whole; larger ones by 16 blocks of 64 KiB
_BLOCK, _BLOCKS = 64 << 10, 16


class MarginalTerm(Protocol):
    """What an estimate reads of a Jeffrey term
    (:class:`~diffsample.guidance.jeffrey.class_guidance.JeffreyGuidance`)."""

    target: Tensor
    variant: str
    base: str
    estimator: str
    classifier: Any
    clean_classifier: Any


@dataclass(frozen=True)
class ModelMarginal:
    """A model marginal and where it came from.

    Attributes:
        estimate: the marginal (``probs`` ``(K,)``, ``n`` samples, ``kind``).
        source: ``"estimated"`` (sampled now), ``"cache"`` (read from the cache, nothing sampled)
            or ``"given"`` (set by the user, ``model_marginal=``; see :meth:`given`).
        key: the cache key (``None`` when given).
        cache_path: the cache file used, or ``None`` (caching off, or given).
        model_evals: network passes spent now, in forward-equivalents summed over all samples
            (0 unless ``source == "estimated"``); never part of a run's ``model_evals``.
        nfe: denoiser calls per sample of the estimation run (0 unless estimated by sampling).
        wall_time_s: seconds spent obtaining it.
        seeds: ``(first, last)`` per-sample seed of the estimate, or ``None`` when given.
    """

    estimate: MarginalEstimate
    source: str
    key: str | None = None
    cache_path: str | None = None
    model_evals: float = 0.0
    nfe: int = 0
    wall_time_s: float = 0.0
    seeds: tuple[int, int] | None = None

    @classmethod
    def given(cls, probs: Tensor) -> "ModelMarginal":
        """A marginal ``probs`` ``(K,)`` set by the user: nothing estimated, nothing cached."""
        return cls(MarginalEstimate(torch.as_tensor(probs, dtype=torch.float64), 0, "given"), "given")

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable summary for a run record (``run.json``)."""
        given = self.source == "given"
        return {"probs": self.estimate.probs.tolist(), "n": None if given else self.estimate.n,
                "kind": None if given else self.estimate.kind, "source": self.source, "cache_key": self.key,
                "cache_path": self.cache_path, "model_evals": self.model_evals, "nfe": self.nfe,
                "wall_time_s": round(self.wall_time_s, 4), "seeds": list(self.seeds) if self.seeds else None}


# ---- cache file ----------------------------------------------------------------------------------
def default_cache_path() -> Path:
    """``$DIFFSAMPLE_CACHE_DIR/marginals.json``, else ``$XDG_CACHE_HOME/diffsample/marginals.json``,
    else ``~/.cache/diffsample/marginals.json``."""
    if os.environ.get("DIFFSAMPLE_CACHE_DIR"):
        return Path(os.environ["DIFFSAMPLE_CACHE_DIR"]).expanduser() / CACHE_FILE
    root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else \
        Path.home() / ".cache"
    return root / "diffsample" / CACHE_FILE


def check_cache_path(path: str | os.PathLike) -> Path:
    """``path`` as a cache file that can be created or rewritten.

    Raises:
        ValueError: ``path`` is a directory, lies under a file, or its folder cannot be written.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"marginal cache {str(p)!r} is a directory; give a file path such as {str(p / CACHE_FILE)!r}")
    probe = p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"marginal cache {str(p)!r} cannot be created: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"marginal cache {str(p)!r} cannot be written (no write permission on {str(probe)!r})")
    return p


def resolve_cache_path(cache: str | os.PathLike | None) -> Path | None:
    """The cache file for ``cache``: ``None`` -> :func:`default_cache_path` (not checked: an
    unwritable default only warns when written); ``""`` / ``"none"`` -> ``None`` (no caching);
    otherwise the path, checked with :func:`check_cache_path`.

    Raises:
        ValueError: an explicit path that cannot be used (see :func:`check_cache_path`).
    """
    if cache is None:
        return default_cache_path()
    if isinstance(cache, str) and cache.strip().lower() in NO_CACHE:
        return None
    return check_cache_path(cache)


def _read_cache(path: Path) -> dict[str, Any] | None:
    """The cache's entries; ``{}`` when missing; ``None`` (after a warning) when unreadable or
    corrupt: not a regular file (a FIFO, a device, a link to ``/dev/zero``), larger than 16 MiB,
    not UTF-8, invalid or too deeply nested JSON, or not a mapping; the caller recomputes and
    replaces the file (:func:`diffsample.core.files.read_json`)."""
    try:
        data = read_json(path, "marginal cache")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"marginal cache {str(path)!r} cannot be read ({exc}); recomputing", stacklevel=3)
        return None
    except ValueError as exc:  # not a regular file, too large, not UTF-8, invalid JSON, nested too deep
        warnings.warn(f"{exc}; the cache is corrupt: recomputing and overwriting it", stacklevel=3)
        return None
    if not isinstance(data, dict) or "probs" in data:
        warnings.warn(f"marginal cache {str(path)!r} is corrupt (not a mapping of keys to estimates); "
                      "recomputing and overwriting it", stacklevel=3)
        return None
    return data


def _entry_estimate(entry: Any, num_classes: int, n: int) -> MarginalEstimate | None:
    """A cached entry as an estimate, or ``None`` if it is malformed or does not fit."""
    try:
        est = MarginalEstimate.from_json(entry)
    except ValueError:
        return None
    p = est.probs
    if (p.ndim != 1 or p.numel() != num_classes or est.n != n or not bool(torch.isfinite(p).all())
            or bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > SUM_TOL):
        return None
    return est


def _write_entry(path: Path, key: str, estimate: MarginalEstimate, extra: dict[str, Any]) -> bool:
    """:func:`~diffsample.guidance.jeffrey.class_marginal.save_marginal` (atomic; keeps other processes' entries;
    replaces a corrupt file); ``False`` (after a warning) if the file cannot be written: the cache
    is an optimisation, never a failure."""
    try:
        save_marginal(path, key, estimate, extra)
    except OSError as exc:
        warnings.warn(f"marginal cache {str(path)!r} cannot be written ({exc}); the estimate is not cached",
                      stacklevel=3)
        return False
    return True


# ---- keys -----------------------------------------------------------------------------------------
def _file_fingerprint(path: Path) -> str:
    """sha256 of the whole file (up to 8 MiB) or of its size and 16 evenly spaced 64 KiB blocks
    (which include the safetensors header and change with any retrained or fine-tuned weights)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _WHOLE_FILE:
            h.update(fh.read())
        else:
            for k in range(_BLOCKS):
                fh.seek(k * (size - _BLOCK) // (_BLOCKS - 1))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def model_identity(name: str, weight_files: Sequence[str | os.PathLike] = ()) -> str:
    """``name@fingerprint``: the model name plus a short hash over the content of ``weight_files``
    (those that exist; whole files up to 8 MiB, sampled blocks beyond; a copied folder keeps its
    identity, retrained weights change it). Just ``name`` when there are none (e.g. a model built
    in code)."""
    files = [Path(f) for f in weight_files if Path(f).is_file()]
    if not files:
        return name
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_file_fingerprint(f).encode())
    return f"{name}@{h.hexdigest()[:16]}"


def marginal_key_fields(term: MarginalTerm, context: PrepareContext, *, n: int, seed: int) -> dict[str, Any]:
    """Everything that determines the estimate of ``term``'s model marginal (see the module docstring)."""
    fields: dict[str, Any] = {"model": model_identity(context.model, context.weight_files), "dtype": context.dtype,
                              "variant": term.variant}
    if term.variant == "score":
        fields.update(base=term.base, estimator=term.estimator,
                      **{k: context.sampler[k] for k in ("solver", "step_schedule", "steps", "final")},
                      below=list(context.below))
    else:
        fields.update(estimator="classifier_prior")
    fields.update(n=n, seed=seed)
    return fields


def marginal_key(fields: Mapping[str, Any]) -> str:
    """A readable, canonical cache key: ``k=v`` pairs joined by ``"; "``."""
    return "; ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in fields.items())


# ---- estimation -----------------------------------------------------------------------------------
def check_count(name: str, value: Any, lo: int) -> int:
    """``value`` if it is an integer (not a bool) ``>= lo``.

    Raises:
        ValueError: otherwise, naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _sample_marginal(term: MarginalTerm, context: PrepareContext, seeds: list[int]) -> tuple[MarginalEstimate, float, int]:
    """``(soft-label estimate, model evals summed over samples, nfe per sample)``: unguided samples
    labelled by the classifier of ``term``'s estimator (noise-aware at ``t_min``, or the clean one)."""
    if term.base == "conditional" and context.num_classes is not None:
        raise ValueError("estimating the model marginal of a Jeffrey term with base='conditional' on a "
                         "class-conditional model is not supported (p_theta(y) would depend on each row's "
                         "class); estimate it yourself and pass model_marginal=...")
    t_min = float(context.denoiser.noise_schedule.t_min)

    def cond_fn(b: int):
        labels = None if context.num_classes is None else torch.zeros(b, dtype=torch.long)
        return base_cond(context.model_cond(labels), term.base)

    samples = context.sample_unguided(context.denoiser, seeds, cond_fn)

    def classify(x: Tensor) -> Tensor:
        if term.estimator == "noisy":
            return term.classifier(x, torch.full((x.shape[0],), t_min, dtype=x.dtype, device=x.device))
        return term.clean_classifier(x)

    est = estimate_marginal(samples.x, classify, kind="soft", batch_size=context.batch_size)
    return est, samples.model_evals, samples.nfe


def _classifier_prior(term: MarginalTerm, context: PrepareContext, seeds: list[int]) -> MarginalEstimate:
    """:func:`diffsample.guidance.jeffrey.class_marginal.classifier_prior` over seeded noise scaled to the marginal
    std at ``t_max``, in batches of ``context.batch_size``."""
    ns = context.denoiser.noise_schedule
    t_max = float(ns.t_max)
    t64 = torch.tensor([t_max], dtype=torch.float64)
    scale = math.hypot(float(ns.alpha(t64)), float(ns.sigma(t64)))
    total = 0.0
    for lo in range(0, len(seeds), context.batch_size):
        noise = context.noise(seeds[lo:lo + context.batch_size]) * scale
        total = total + classifier_prior(term.classifier, noise, t_max).probs * noise.shape[0]
    return MarginalEstimate(total / len(seeds), len(seeds), "prior")


def model_marginal_for(term: MarginalTerm, context: PrepareContext, *, n: int = 1000, seed: int = 0,
                       cache: str | os.PathLike | None = None) -> ModelMarginal:
    """The model marginal ``p_theta(y)`` that ``term`` needs, from the cache or estimated (see the
    module docstring for what is sampled and classified).

    Args:
        term: the Jeffrey term (its ``variant``, ``base``, ``estimator`` and classifiers are used;
            its own ``model_marginal`` is ignored).
        context: what the run offers: the denoiser chain below the term (``context.below`` names
            it, part of the key), unguided sampling with the run's sampler, seeded noise, the
            model's conditioning, identity and dtype, ``batch_size`` (does not change the
            estimate) and the progress flag.
        n: number of unguided samples (or noise draws for the conditional variant), >= 1.
        seed: sample ``i`` uses the per-sample seed ``MARGINAL_SEED_BASE + seed + i``.
        cache: the JSON cache file; ``None`` -> :func:`default_cache_path`; ``""`` or ``"none"``
            -> no caching.

    Returns:
        A :class:`ModelMarginal`; ``source="cache"`` means nothing was sampled.

    Raises:
        ValueError: ``n``, ``seed`` or ``context.batch_size`` out of range; an unusable explicit
            ``cache`` path; base ``"conditional"`` on a class-conditional model; a classifier
            whose number of classes differs from the target's.
    """
    n = check_count("marginal_samples", n, 1)
    seed = check_count("marginal seed", seed, 0)
    check_count("batch_size", context.batch_size, 1)
    path = resolve_cache_path(cache)
    fields = marginal_key_fields(term, context, n=n, seed=seed)
    key = marginal_key(fields)
    k = term.target.numel()
    start = time.perf_counter()
    if path is not None:
        data = _read_cache(path)
        if data is not None and key in data:
            est = _entry_estimate(data[key], k, n)
            if est is not None:
                return ModelMarginal(est, "cache", key, str(path), wall_time_s=time.perf_counter() - start,
                                     seeds=(MARGINAL_SEED_BASE + seed, MARGINAL_SEED_BASE + seed + n - 1))
            warnings.warn(f"marginal cache {str(path)!r}: the entry for this key is malformed or has the wrong "
                          f"number of classes (expected {k}); recomputing and overwriting it", stacklevel=2)
    seeds = list(range(MARGINAL_SEED_BASE + seed, MARGINAL_SEED_BASE + seed + n))
    if term.variant == "score":
        est, evals, nfe = _sample_marginal(term, context, seeds)
    else:
        est, evals, nfe = _classifier_prior(term, context, seeds), 0.0, 0
    if est.probs.numel() != k:
        raise ValueError(f"classifier gives {est.probs.numel()} classes, the target marginal has {k}")
    wall = time.perf_counter() - start
    if path is not None:
        _write_entry(path, key, est, {"model_evals": evals, "nfe": nfe, "wall_time_s": round(wall, 3),
                                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                      "fields": fields})
    return ModelMarginal(est, "estimated", key, None if path is None else str(path), evals, nfe, wall,
                         (seeds[0], seeds[-1]))
