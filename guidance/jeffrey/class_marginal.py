"""Class marginals for Jeffrey guidance: parsing a target ``p*(y)``, estimating the model marginal
``p_theta(y)`` from samples, caching it, and turning both into log-weights ``log p*/p_theta``."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsample.core.files import json_array, json_int, json_numbers, json_object, json_type, read_json

SUM_TOL = 1e-6


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{what}: {v!r} is not a number")
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what}: {v!r} is not a number") from None


def _cls(k: Any, num_classes: int | None) -> int:
    try:
        i = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"target marginal: class {k!r} is not an integer class index") from None
    if str(i) != str(k).strip() and not isinstance(k, int):
        raise ValueError(f"target marginal: class {k!r} is not an integer class index")
    if i < 0 or (num_classes is not None and i >= num_classes):
        valid = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise ValueError(f"target marginal names class {i}, which the classifier does not have (valid: {valid})")
    return i


def parse_target(target: str | os.PathLike | Mapping | Sequence[float] | Tensor,
                 num_classes: int | None) -> Tensor:
    """A target class marginal ``p*(y)`` as a float64 tensor of shape ``(num_classes,)``.

    Accepted forms: a mapping ``{class: prob}`` (unnamed classes get 0); a string
    ``"0:0.5,1:0.5"`` (``;`` or ``/`` also separate entries, ``=`` may replace ``:``) or a full list
    ``"0.5;0.3;0.2"``; a path to a
    JSON file holding such a mapping or a full list; a full list / tensor of ``num_classes`` probs.

    Raises:
        ValueError: entries not summing to 1 (beyond 1e-6), negative or non-finite entries, a class
            the classifier does not have, an unreadable file, or an unknown number of classes for
            a form that needs it.
    """
    if isinstance(target, (str, os.PathLike)) and not isinstance(target, str) or (
            isinstance(target, str) and target.strip().endswith(".json")):
        path = Path(target)
        try:
            target = read_json(path, "target marginal file")
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(target, list):
            json_numbers(target, f"target marginal file {str(path)!r}: entry")
        elif not isinstance(target, dict):
            raise ValueError(f"target marginal file {str(path)!r} must hold an object {{CLASS: PROB, ...}} or a "
                             f"list [P0, P1, ...], got {json_type(target)}")
    if isinstance(target, str):
        items = [p for p in target.replace(";", ",").replace("/", ",").split(",") if p.strip()]
        mapping: dict[Any, Any] = {}
        if items and not any(":" in i or "=" in i for i in items):  # a full list of probabilities
            items = [f"{k}:{v}" for k, v in enumerate(items)]
        for item in items:
            k, sep, v = item.replace("=", ":").partition(":")
            if not sep:
                raise ValueError(f"target marginal entry {item!r} must be CLASS:PROB (e.g. '0:0.5,1:0.5')")
            mapping[k.strip()] = v.strip()
        target = mapping
    if isinstance(target, Mapping):
        if num_classes is None:
            num_classes_eff = 1 + max(_cls(k, None) for k in target) if target else 0
        else:
            num_classes_eff = num_classes
        probs = torch.zeros(num_classes_eff, dtype=torch.float64)
        for k, v in target.items():
            probs[_cls(k, num_classes)] += _num(v, f"target marginal entry for class {k}")
    else:
        if isinstance(target, Tensor):
            values = target.detach().flatten().tolist()
        elif isinstance(target, (str, bytes)) or not isinstance(target, (Sequence, np.ndarray)):
            raise ValueError(f"target marginal must be a mapping, a string, a JSON file or a list of probabilities, "
                             f"got {type(target).__name__}")
        else:
            values = list(np.asarray(target, dtype=object).flatten()) if isinstance(target, np.ndarray) else list(target)
        probs = torch.as_tensor([_num(v, "target marginal") for v in values], dtype=torch.float64)
        if num_classes is not None and probs.numel() != num_classes:
            raise ValueError(f"target marginal has {probs.numel()} entries; the classifier has {num_classes} classes")
    if probs.numel() == 0:
        raise ValueError("target marginal is empty")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"target marginal has non-finite entries: {probs.tolist()}")
    if bool((probs < 0).any()):
        bad = {i: v for i, v in enumerate(probs.tolist()) if v < 0}
        raise ValueError(f"target marginal has negative entries {bad}; probabilities must be >= 0")
    total = float(probs.sum())
    if abs(total - 1.0) > SUM_TOL:
        raise ValueError(f"target marginal sums to {total:.9g}, not 1 (tolerance {SUM_TOL:g})")
    return probs


@dataclass(frozen=True)
class MarginalEstimate:
    """A Monte-Carlo estimate of the model's class marginal.

    Attributes:
        probs: ``(K,)`` float64, sums to 1.
        n: number of samples it was estimated from.
        kind: ``"soft"`` (mean of classifier probabilities) or ``"hard"`` (argmax histogram).
    """

    probs: Tensor
    n: int
    kind: str = "soft"

    def stderr(self) -> Tensor:
        """Binomial standard error per class, ``sqrt(p (1 - p) / n)``."""
        return (self.probs * (1 - self.probs) / max(self.n, 1)).sqrt()

    def to_json(self) -> dict[str, Any]:
        return {"probs": self.probs.tolist(), "n": self.n, "kind": self.kind}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], what: str = "marginal estimate") -> "MarginalEstimate":
        """The estimate in a parsed JSON object ``{"probs": [...], "n": N, "kind": ...}``.

        Raises:
            ValueError: not an object, ``probs`` not a non-empty list of finite numbers, ``n`` not
                an integer >= 0, ``kind`` not a string; one line naming ``what``.
        """
        d = json_object(d, what)
        if "probs" not in d:
            raise ValueError(f"{what} has no 'probs' (a list of class probabilities); keys: {', '.join(map(str, d)) or 'none'}")
        json_array(d["probs"], f"{what}: probs")
        probs = json_numbers(d["probs"], f"{what}: probs entry")
        if not probs:
            raise ValueError(f"{what}: probs is empty")
        n = json_int(d.get("n", 0), f"{what}: n", 0)
        kind = d.get("kind", "soft")
        if not isinstance(kind, str):
            raise ValueError(f"{what}: kind must be a string, got {json_type(kind)}")
        return cls(torch.tensor(probs, dtype=torch.float64), n, kind)


def estimate_marginal(samples: Tensor, classify: Callable[[Tensor], Tensor], kind: str = "soft",
                      batch_size: int = 500) -> MarginalEstimate:
    """Estimate ``p_theta(y)`` from clean model samples ``(n, *dims)``: the mean of
    ``softmax(classify(x))`` (``kind="soft"``) or the histogram of
    its argmax (``"hard"``). ``classify`` maps clean samples to logits ``(b, K)``.

    Raises:
        ValueError: unknown ``kind`` or no samples.
    """
    if kind not in ("soft", "hard"):
        raise ValueError(f"unknown marginal estimate kind {kind!r}; valid: soft, hard")
    if samples.shape[0] == 0:
        raise ValueError("estimate_marginal needs at least one sample")
    total = None
    with torch.no_grad():
        for start in range(0, samples.shape[0], batch_size):
            logits = classify(samples[start:start + batch_size]).to(torch.float64)
            p = torch.softmax(logits, dim=1)
            if kind == "hard":
                p = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(torch.float64)
            total = p.sum(0) if total is None else total + p.sum(0)
    n = samples.shape[0]
    return MarginalEstimate(total / n, n, kind)


def save_marginal(path: str | os.PathLike, key: str, estimate: MarginalEstimate,
                  extra: Mapping[str, Any] | None = None) -> None:
    """Store ``estimate`` (plus the JSON-serialisable ``extra`` fields) under ``key`` (e.g. model +
    sampler spec) in the JSON cache ``path``. The file is re-read first, so entries other processes
    wrote meanwhile are kept (a corrupt or non-mapping file is replaced), and written atomically
    (temporary file + ``os.replace``); missing folders are created.

    Raises:
        OSError: the file or its folder cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = read_json(path, "marginal cache")
        if not isinstance(data, dict) or "probs" in data:
            data = {}
    except (OSError, ValueError):  # missing, not a regular file, too large, binary, corrupt: replaced
        data = {}
    data[key] = {**estimate.to_json(), **(extra or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_marginal(path: str | os.PathLike, key: str | None = None) -> MarginalEstimate | None:
    """The estimate in the JSON file ``path``: the file's only object when it is one estimate
    ``{"probs": [...], "n": N}``, else the entry under ``key`` (or the file's only entry when
    ``key`` is None) of a mapping ``{key: estimate}``; ``None`` when the file or the key is absent.

    Raises:
        ValueError: the file is not a regular UTF-8 JSON file within the size and depth limits
            (:func:`diffsample.core.files.read_json`), is not an object, an entry is not an estimate
            (:meth:`MarginalEstimate.from_json`), or the file holds several entries and no ``key``
            was given.
    """
    path = Path(path)
    try:
        data = json_object(read_json(path, "marginal file"), f"marginal file {str(path)!r}")
    except FileNotFoundError:
        return None
    if "probs" in data:
        return MarginalEstimate.from_json(data, f"marginal file {str(path)!r}")
    if key is None:
        if len(data) != 1:
            raise ValueError(f"marginal file {str(path)!r} holds {len(data)} entries; name one: "
                             f"{', '.join(list(data)[:10])}{', ...' if len(data) > 10 else ''}")
        key = next(iter(data))
    return MarginalEstimate.from_json(data[key], f"marginal file {str(path)!r}, entry {key!r}") if key in data else None


def log_weights(target: Tensor, model_marginal: Tensor, clip: float | None = None) -> Tensor:
    """``log w(y) = log p*(y) - log p_theta(y)``, ``-inf`` where ``p*(y) = 0``.

    Raises:
        ValueError: shapes differ, or ``p_theta(y)`` is estimated as zero for some class (dividing
            by it is undefined; estimate from more samples or with soft labels).
    """
    target = torch.as_tensor(target, dtype=torch.float64)
    model_marginal = torch.as_tensor(model_marginal, dtype=torch.float64)
    if target.shape != model_marginal.shape:
        raise ValueError(f"target marginal has {target.numel()} classes, the model marginal {model_marginal.numel()}")
    zero = (model_marginal <= 0).nonzero().flatten().tolist()
    if zero:
        k = zero[0]
        raise ValueError(f"model marginal p_theta(y={k}) is estimated as 0 (target p*={float(target[k]):.6g}); "
                         "the Jeffrey weight p*/p_theta is undefined there: estimate p_theta from more samples "
                         "or with soft labels (kind='soft')")
    lw = torch.where(target > 0, torch.log(target.clamp_min(1e-300)) - torch.log(model_marginal),
                     torch.full_like(target, -math.inf))
    if clip is not None:
        lw = torch.where(torch.isfinite(lw), lw.clamp(-clip, clip), lw)
    return lw


def total_variation(p: Tensor, q: Tensor) -> float:
    """``0.5 * sum |p - q|``."""
    return 0.5 * float((torch.as_tensor(p, dtype=torch.float64) - torch.as_tensor(q, dtype=torch.float64)).abs().sum())


def classifier_prior(classifier: Callable[[Tensor, Tensor], Tensor], noise: Tensor, t_max: float) -> MarginalEstimate:
    """The class prior implicit in a noise-aware classifier: the mean of
    ``softmax(classifier(x, t_max))`` over pure-noise inputs ``noise`` (``(n, *dims)``, already
    scaled to the marginal at ``t_max``). At the noisiest level ``p_t(y | x_t) -> p(y)``, the label
    frequencies the classifier was trained on; this is the ``p(y)`` that turns the classifier into
    class-conditional likelihoods, ``p_t(x | y) ∝ p_t(y | x) / p(y)`` (the conditional variant of
    Jeffrey guidance needs it)."""
    with torch.no_grad():
        logits = classifier(noise, torch.full((noise.shape[0],), float(t_max), dtype=noise.dtype, device=noise.device))
    return MarginalEstimate(torch.softmax(logits.to(torch.float64), 1).mean(0), noise.shape[0], "prior")
