"""Where the bundled MNIST testbed's files live, and their loaders (safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffsample.testbed.mnist.networks import DigitClassifier, NoisyDigitClassifier

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
"""Folder holding the bundled weights, ``eval.json`` and ``MODEL_CARD.md``."""
MODEL_DIR: Path = WEIGHTS_DIR / "mnist-cond"
"""The diffusers model folder (``model_index.json``, ``unet/``, ``scheduler/``)."""
NUM_CLASSES = 10
"""Digit classes 0..9."""
NULL_CLASS = 10
"""Class label meaning "unconditional" (for classifier-free guidance)."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the testbed weights are not bundled in this checkout; "
            "train them with `OMP_NUM_THREADS=1 python -m diffsample.testbed.mnist.train --out <dir>`"
        )
    return path


def load_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the class-conditional ``UNet2DModel`` (EMA weights) in eval mode.

    Call as ``unet(x_t, t, class_labels=y).sample`` with x_t (B, 1, 16, 16), t DDPM timesteps in
    [0, 1000) (tensor (B,) or scalar) and y int64 (B,) in 0..9 or :data:`NULL_CLASS`; returns the
    predicted noise eps, (B, 1, 16, 16).

    Raises:
        FileNotFoundError: the weights folder is missing.
    """
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(_require(MODEL_DIR / "unet"), use_safetensors=True, torch_dtype=dtype)
    return unet.to(device=device).eval().requires_grad_(False)


def load_scheduler_config() -> dict:
    """The DDPM training schedule as a diffusers scheduler config dict (``scheduler_config.json``).

    Use e.g. ``DDPMScheduler.from_config(cfg)`` or ``DPMSolverMultistepScheduler.from_config(cfg)``.

    Raises:
        FileNotFoundError: the weights folder is missing.
    """
    return json.loads(_require(MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())


def _load_module(module: torch.nn.Module, name: str, device, dtype) -> torch.nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(_require(WEIGHTS_DIR / name))))
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_classifier(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DigitClassifier:
    """The clean :class:`DigitClassifier` in eval mode: ``features(x)`` (B, 64), ``forward(x)``
    logits (B, 10), x (B, 1, 16, 16) in [-1, 1].

    Raises:
        FileNotFoundError: ``weights/classifier.safetensors`` is missing.
    """
    return _load_module(DigitClassifier(), "classifier.safetensors", device, dtype)


def load_noisy_classifier(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> NoisyDigitClassifier:
    """The noise-aware :class:`NoisyDigitClassifier` in eval mode: ``forward(x_t, t)`` logits (B, 10)
    for x_t in the VP space of the DDPM schedule and t in [0, 1000).

    Raises:
        FileNotFoundError: ``weights/noisy_classifier.safetensors`` is missing.
    """
    return _load_module(NoisyDigitClassifier(), "noisy_classifier.safetensors", device, dtype)
