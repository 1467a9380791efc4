"""Typed checks of :func:`~diffsample.run.generate.generate`'s arguments, run before any model is
loaded or any noise drawn. Every failure is one ``ValueError`` line naming the argument, the bad
value and what is valid."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from diffsample.samplers.seeds import SEED_MAX, check_seed

MEMORY_FRACTION = 0.25
"""A run whose samples and images would take more than this share of the machine's RAM is refused."""
DEVICE_TYPES = ("cpu", "cuda", "mps")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_count(name: str, value: Any, lo: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool or float) ``>= lo``.

    Raises:
        ValueError: otherwise, naming ``name``.
    """
    if not _is_int(value) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_seed_range(seed: Any, num_samples: int) -> int:
    """``seed`` if it is an integer with every per-sample seed ``seed .. seed + num_samples - 1``
    in ``0 .. 2**63 - 1``.

    Raises:
        ValueError: a bool, float, string or out-of-range seed.
    """
    seed = check_seed(seed)
    if seed + num_samples - 1 > SEED_MAX:
        raise ValueError(f"seed {seed} + num_samples {num_samples} - 1 exceeds the largest seed 2**63-1; "
                         f"use seed <= {SEED_MAX - num_samples + 1}")
    return seed


def check_label(name: str, value: Any) -> int | None:
    """``None`` or an integer class label (``True``, ``3.7``, ``"3"`` are refused, not cast).

    Raises:
        ValueError: otherwise, naming ``name``.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        value = int(value)
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer class label, got {value!r}")
    return int(value)


def check_classes(classes: Any) -> list[int] | None:
    """``None`` or a list of integer class labels (a list, tuple, range, integer tensor or array;
    floats, bools and nested lists are refused, not cast).

    Raises:
        ValueError: otherwise.
    """
    if classes is None:
        return None
    if isinstance(classes, (torch.Tensor, np.ndarray)):
        kind = str(classes.dtype)
        if classes.ndim != 1 or not (kind.startswith(("torch.int", "torch.uint", "int", "uint"))):
            raise ValueError(f"classes must be a 1-D sequence of integer class labels, got a {classes.ndim}-D "
                             f"{kind} array")
        return [int(v) for v in classes.tolist()]
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise ValueError(f"classes must be a sequence of integer class labels, got {classes!r}")
    labels = list(classes)
    for v in labels:
        if not _is_int(v):
            raise ValueError(f"classes must hold integer class labels only, got {v!r} in {_short(labels)}")
    return [int(v) for v in labels]


def check_specs(name: str, value: Any) -> list[Any]:
    """A list of registry specs (strings or :class:`~diffsample.core.spec.Spec`); a single string is
    refused (it would be read character by character).

    Raises:
        ValueError: a string, or anything that is not a sequence of specs.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of specs such as ['cfg_zero_star'], got {value!r}")
    for v in value:
        if not isinstance(v, str) and type(v).__name__ != "Spec":
            raise ValueError(f"{name} entries must be spec strings, got {v!r}")
    return list(value)


def check_spec(name: str, value: Any) -> Any:
    """A registry spec: a string or a :class:`~diffsample.core.spec.Spec`.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(value, str) and type(value).__name__ != "Spec":
        raise ValueError(f"{name} must be a spec string such as 'dpmpp_2m', got {value!r}")
    return value


def check_scale(name: str, value: Any) -> float | None:
    """``None`` or a finite real number (not a bool).

    Raises:
        ValueError: otherwise.
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def check_text(name: str, value: Any) -> str | None:
    """``None`` or a string.

    Raises:
        ValueError: otherwise.
    """
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def check_choice(name: str, value: Any, valid: Iterable[str]) -> str:
    """``value`` if it is one of the strings ``valid``.

    Raises:
        ValueError: otherwise, listing ``valid``.
    """
    valid = list(valid)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


def check_device(device: Any) -> torch.device:
    """``device`` (a string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, or a
    ``torch.device``) as a ``torch.device`` this machine has.

    Raises:
        ValueError: an unparsable name, a device type other than cpu / cuda / mps (``meta`` holds
            no data), or a device this machine does not have.
    """
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r} cannot run a model; valid: cpu, cuda, cuda:N, mps")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA device (torch.cuda.is_available() "
                             "is False); use device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use device cpu")
    return dev


def total_memory() -> int | None:
    """Physical memory of this machine in bytes, or ``None`` when the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(num_samples: int, bytes_per_sample: int, what: str = "samples and images",
                 fraction: float = MEMORY_FRACTION, memory: int | None = None) -> None:
    """Refuse a run whose results (``num_samples * bytes_per_sample``) would take more than
    ``fraction`` of the machine's RAM, before anything is allocated.

    Raises:
        ValueError: naming ``num_samples``, the estimate and the limit.
    """
    memory = total_memory() if memory is None else memory
    if memory is None:
        return
    need = num_samples * bytes_per_sample
    limit = fraction * memory
    if need > limit:
        most = max(1, int(limit // max(bytes_per_sample, 1)))
        raise ValueError(f"num_samples={num_samples} would hold {_gb(need)} of {what} in memory, more than "
                         f"{fraction:.0%} of this machine's RAM ({_gb(memory)}); use num_samples <= {most} per run")


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _short(values: list[Any], n: int = 8) -> str:
    return repr(values) if len(values) <= n else repr(values[:n])[:-1] + ", ...]"


def result_bytes_per_sample(model: Any) -> int:
    """Bytes one sample of a run on ``model`` holds in memory until the run returns: float32
    samples (kept per batch, then concatenated) and float32 images. For a
    :class:`~diffsample.run.models.LoadedModel` ``12 * prod(sample_shape)``; for a pipeline
    model the latents plus a 3-channel image ``vae_scale_factor`` times larger in each spatial
    dimension (latents with at least 4 channels per pixel)."""
    shape = getattr(model, "sample_shape", None)
    if shape is not None:
        return 12 * math.prod(int(d) for d in shape) + 64
    den = model.denoiser
    numel = math.prod(int(d) for d in den.noise_shape())
    factor = int(getattr(den.pipe, "vae_scale_factor", 8) or 8)
    return 8 * numel + 4 * (3 * numel * factor * factor) // 4 + 64


def batch_coupled(solver: Any, terms: Sequence[Any] = (), hooks: Any = None) -> bool:
    """Whether a run's samples depend on the batch they are drawn in (and so on ``batch_size``):
    a solver that says so (``solver.batch_coupled``, e.g. SteinDiff), a guidance term that says so
    (``term.batch_coupled``, e.g. SVDD drawing its picks from one generator per batch), or twisted
    SMC (``hooks.twist``: resampling draws shared by the batch). Otherwise a seed gives the same
    sample whatever the batch size (up to batched floating-point arithmetic)."""
    from diffsample.guidance.interval import windowed_term

    if bool(getattr(solver, "batch_coupled", False)):
        return True
    if hooks is not None and getattr(hooks, "twist", None) is not None:
        return True
    return any(bool(getattr(windowed_term(t), "batch_coupled", False)) or bool(getattr(t, "batch_coupled", False))
               for t in terms)
