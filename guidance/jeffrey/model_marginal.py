"""The model marginal ``p_theta(y)`` that Jeffrey guidance divides by, estimated on demand and cached.

Jeffrey guidance reweights the model's own joint by ``w(y) = p*(y) / p_theta(y)``
(methods-guidance.md section 3.3), where ``p_theta(y)`` is the class marginal of the *unguided
sampler* on the branch the term reweights. :func:`model_marginal_for` obtains it:

* ``variant="score"``: ``n`` unguided samples with the same sampler (solver, step schedule,
  ``steps``, ``final``) on the term's base branch (``base="unconditional"``: the null / negative
  condition of a class-conditional model; an unconditional model as is), each soft-labelled by the
  classifier the term's estimator uses for ``p(y | x0)``: ``estimator="noisy"`` -> the noise-aware
  classifier at the schedule's smallest time ``t_min`` (timestep 0 for a DDPM model, as
  ``benchmarks/guidance_mnist.py`` does); ``"tweedie"`` -> the clean classifier on the samples.
  ``p_theta(y) = (1/n) sum_i p(y | x_i)``.
* ``variant="conditional"``: the class prior implicit in the noise-aware classifier, its mean
  output on pure noise at ``t_max`` (:func:`diffsample.guidance.jeffrey.class_marginal.classifier_prior`); no
  model evaluation.

Seeds: sample ``i`` of an estimate with seed ``s`` uses the per-sample seed
``MARGINAL_SEED_BASE + s + i`` (``MARGINAL_SEED_BASE = 10**9``), so it never shares noise with a
run's own samples (seeds ``0 .. 10**9 - 1``). :func:`~diffsample.run.generate.generate` uses
``s = 0`` whatever its ``seed``, so every run of one model and sampler shares one estimate.

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
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffsample.guidance.term import Denoiser, Guidance
from diffsample.guidance.classifier import base_cond
from diffsample.guidance.interval import windowed_term, with_windowed_term
from diffsample.guidance.jeffrey.class_guidance import JeffreyGuidance
from diffsample.guidance.jeffrey.class_marginal import (SUM_TOL, MarginalEstimate, classifier_prior, estimate_marginal,
                                          save_marginal)

from diffsample.run.models import LoadedModel
from diffsample.samplers.sampler import Sampler
from diffsample.samplers.seeds import seeded_noise, seeded_run

MARGINAL_SEED_BASE = 10**9
"""Per-sample seeds of a marginal estimate start here (disjoint from the seeds users sample with)."""
CACHE_FILE = "marginals.json"
NO_CACHE = ("", "none")
"""Values of ``cache`` (case-insensitive) that turn caching off."""
SOURCES = ("estimated", "cache", "given")
_WHOLE_FILE = 8 << 20  # files up to 8 MiB are hashed whole; larger ones by 16 blocks of 64 KiB
_BLOCK, _BLOCKS = 64 << 10, 16


@dataclass(frozen=True)
class ModelMarginal:
    """A model marginal and where it came from.

    Attributes:
        estimate: the marginal (``probs`` ``(K,)``, ``n`` samples, ``kind``).
        source: ``"estimated"`` (sampled now), ``"cache"`` (read from the cache, nothing sampled)
            or ``"given"`` (set by the user, ``model_marginal=``).
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
    """The cache's entries; ``{}`` when missing; ``None`` (after a warning) when corrupt."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"marginal cache {str(path)!r} cannot be read ({exc}); recomputing", stacklevel=3)
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        warnings.warn(f"marginal cache {str(path)!r} is corrupt (invalid JSON: {exc}); recomputing and "
                      "overwriting it", stacklevel=3)
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
    except (TypeError, KeyError, ValueError, RuntimeError):
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


def _weight_files(loaded: LoadedModel) -> list[Path]:
    """The files whose content determines ``loaded`` and its classifiers (empty when unknown)."""
    if loaded.name == "mnist":
        from diffsample.testbed import mnist

        folder = mnist.MODEL_DIR
        extra = [mnist.WEIGHTS_DIR / "classifier.safetensors", mnist.WEIGHTS_DIR / "noisy_classifier.safetensors"]
    else:
        folder, extra = Path(loaded.name), []
        if not folder.is_dir():
            return []
    files = sorted((folder / "unet").glob("*.safetensors")) + [folder / "unet" / "config.json",
                                                               folder / "scheduler" / "scheduler_config.json"]
    return [f for f in files + extra if f.is_file()]


def model_identity(loaded: LoadedModel) -> str:
    """``name@fingerprint``: the model name plus a short hash over the content of its weight and
    config files (whole files up to 8 MiB, sampled blocks beyond; a copied folder keeps its
    identity, retrained weights change it). Just the name for a model without known files (e.g. a
    :class:`LoadedModel` built in code)."""
    files = _weight_files(loaded)
    if not files:
        return loaded.name
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_file_fingerprint(f).encode())
    return f"{loaded.name}@{h.hexdigest()[:16]}"


def marginal_key_fields(term: JeffreyGuidance, loaded: LoadedModel, sampler: Sampler, *, n: int, seed: int,
                        below: Sequence[str] = ()) -> dict[str, Any]:
    """Everything that determines the estimate of ``term``'s model marginal (see the module docstring)."""
    fields: dict[str, Any] = {"model": model_identity(loaded), "dtype": str(loaded.dtype).removeprefix("torch."),
                              "variant": term.variant}
    if term.variant == "score":
        fields.update(base=term.base, estimator=term.estimator, solver=repr(sampler.solver),
                      step_schedule=repr(sampler.step_schedule), steps=sampler.steps, final=sampler.final,
                      below=list(below))
    else:
        fields.update(estimator="classifier_prior")
    fields.update(n=n, seed=seed)
    return fields


def marginal_key(fields: Mapping[str, Any]) -> str:
    """A readable, canonical cache key: ``k=v`` pairs joined by ``"; "``."""
    return "; ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in fields.items())


# ---- estimation -----------------------------------------------------------------------------------
def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _sample_marginal(term: JeffreyGuidance, loaded: LoadedModel, sampler: Sampler, denoiser: Denoiser,
                     seeds: list[int], batch_size: int, progress: bool) -> tuple[MarginalEstimate, float, int]:
    """``(soft-label estimate, model evals summed over samples, nfe per sample)``: unguided samples
    labelled by the classifier of ``term``'s estimator (noise-aware at ``t_min``, or the clean one)."""
    if term.base == "conditional" and loaded.num_classes is not None:
        raise ValueError("estimating the model marginal of a Jeffrey term with base='conditional' on a "
                         "class-conditional model is not supported (p_theta(y) would depend on each row's "
                         "class); estimate it yourself and pass model_marginal=...")
    sampler = replace(sampler, progress=False)
    t_min = float(denoiser.noise_schedule.t_min)
    xs, evals, nfe = [], 0.0, 0
    for lo in tqdm(range(0, len(seeds), batch_size), disable=not progress, leave=False, desc="model marginal"):
        batch = seeds[lo:lo + batch_size]
        labels = None if loaded.num_classes is None else torch.zeros(len(batch), dtype=torch.long)
        cond = base_cond(loaded.cond(labels), term.base)
        result = sampler(denoiser, cond=cond, **seeded_run(batch, loaded.sample_shape, loaded.device))
        xs.append(result.x)
        evals += result.model_evals * len(batch)
        nfe = result.nfe

    def classify(x: Tensor) -> Tensor:
        if term.estimator == "noisy":
            return term.classifier(x, torch.full((x.shape[0],), t_min, dtype=x.dtype, device=x.device))
        return term.clean_classifier(x)

    return estimate_marginal(torch.cat(xs), classify, kind="soft", batch_size=batch_size), evals, nfe


def _classifier_prior(term: JeffreyGuidance, loaded: LoadedModel, denoiser: Denoiser, seeds: list[int],
                      batch_size: int) -> MarginalEstimate:
    """:func:`diffsample.guidance.jeffrey.class_marginal.classifier_prior` over seeded noise scaled to the marginal
    std at ``t_max``, in batches of ``batch_size``."""
    ns = denoiser.noise_schedule
    t_max = float(ns.t_max)
    t64 = torch.tensor([t_max], dtype=torch.float64)
    scale = math.hypot(float(ns.alpha(t64)), float(ns.sigma(t64)))
    total = 0.0
    for lo in range(0, len(seeds), batch_size):
        noise = seeded_noise(seeds[lo:lo + batch_size], loaded.sample_shape, device=loaded.device) * scale
        total = total + classifier_prior(term.classifier, noise, t_max).probs * noise.shape[0]
    return MarginalEstimate(total / len(seeds), len(seeds), "prior")


def _num_classes(term: JeffreyGuidance) -> int:
    return term.target.numel()


def model_marginal_for(term: JeffreyGuidance, loaded: LoadedModel, sampler: Sampler, *, n: int = 1000,
                       seed: int = 0, batch_size: int = 64, cache: str | os.PathLike | None = None,
                       denoiser: Denoiser | None = None, below: Sequence[str] = (),
                       progress: bool = False) -> ModelMarginal:
    """The model marginal ``p_theta(y)`` that ``term`` needs, from the cache or estimated (see the
    module docstring for what is sampled and classified).

    Args:
        term: the Jeffrey term (its ``variant``, ``base``, ``estimator`` and classifiers are used;
            its own ``model_marginal`` is ignored).
        loaded: the model (sample shape, device, conditioning, identity for the cache key).
        sampler: the sampler of the run; the estimate uses the same solver, step schedule, steps
            and ``final``.
        n: number of unguided samples (or noise draws for the conditional variant), >= 1.
        seed: sample ``i`` uses the per-sample seed ``MARGINAL_SEED_BASE + seed + i``.
        batch_size: samples per sampler call (does not change the estimate).
        cache: the JSON cache file; ``None`` -> :func:`default_cache_path`; ``""`` or ``"none"``
            -> no caching.
        denoiser: the denoiser ``term`` wraps (default ``loaded.denoiser``); pass the chain of the
            guidance terms applied before it, and name them in ``below`` (part of the key).
        below: specs of the guidance terms inside ``denoiser``.
        progress: show a progress bar over batches.

    Returns:
        A :class:`ModelMarginal`; ``source="cache"`` means nothing was sampled.

    Raises:
        ValueError: ``n``, ``seed`` or ``batch_size`` out of range; an unusable explicit ``cache``
            path; base ``"conditional"`` on a class-conditional model (see below); a classifier
            whose number of classes differs from the target's.
    """
    n = _check_int("marginal_samples", n, 1)
    seed = _check_int("marginal seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    path = resolve_cache_path(cache)
    denoiser = loaded.denoiser if denoiser is None else denoiser
    fields = marginal_key_fields(term, loaded, sampler, n=n, seed=seed, below=below)
    key = marginal_key(fields)
    k = _num_classes(term)
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
        est, evals, nfe = _sample_marginal(term, loaded, sampler, denoiser, seeds, batch_size, progress)
    else:
        est, evals, nfe = _classifier_prior(term, loaded, denoiser, seeds, batch_size), 0.0, 0
    if est.probs.numel() != k:
        raise ValueError(f"classifier gives {est.probs.numel()} classes, the target marginal has {k}")
    wall = time.perf_counter() - start
    if path is not None:
        _write_entry(path, key, est, {"model_evals": evals, "nfe": nfe, "wall_time_s": round(wall, 3),
                                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                      "fields": fields})
    return ModelMarginal(est, "estimated", key, None if path is None else str(path), evals, nfe, wall,
                         (seeds[0], seeds[-1]))


def fill_model_marginals(terms: Sequence[Guidance], specs: Sequence[str], loaded: LoadedModel, sampler: Sampler, *,
                         n: int = 1000, seed: int = 0, batch_size: int = 64, cache: str | os.PathLike | None = None,
                         progress: bool = False) -> tuple[list[Guidance], list[ModelMarginal]]:
    """Give every Jeffrey term in ``terms`` (applied in order to ``loaded.denoiser``, possibly
    inside a guidance window) that lacks a model marginal one from :func:`model_marginal_for`,
    estimated on the chain of the terms before it.

    Returns:
        ``(terms, marginals)``: the terms with marginals filled in (others unchanged) and one
        :class:`ModelMarginal` per Jeffrey term, in order (``source="given"`` for a marginal the
        user set).

    Raises:
        ValueError: as :func:`model_marginal_for`; an estimated marginal that is zero on a class
            the target gives mass to (:func:`diffsample.guidance.jeffrey.class_marginal.log_weights`).
    """
    out: list[Guidance] = []
    marginals: list[ModelMarginal] = []
    denoiser = loaded.denoiser
    for i, term in enumerate(terms):
        jeffrey = windowed_term(term)
        if isinstance(jeffrey, JeffreyGuidance):
            if jeffrey.model_marginal is not None:
                marginals.append(ModelMarginal(MarginalEstimate(jeffrey.model_marginal, 0, "given"), "given"))
            else:
                found = model_marginal_for(jeffrey, loaded, sampler, n=n, seed=seed, batch_size=batch_size,
                                           cache=cache, denoiser=denoiser, below=specs[:i], progress=progress)
                term = with_windowed_term(term, jeffrey.with_model_marginal(found.estimate.probs))
                marginals.append(found)
        out.append(term)
        denoiser = term(denoiser)
    return out, marginals
