"""Small classifiers for the 16×16 MNIST testbed.

* :class:`DigitClassifier` — clean classifier p(y | x); its 64-d penultimate features define the
  testbed's Fréchet distance (:func:`diffsample.testbed.mnist.fd.mnist_fd`).
* :class:`NoisyDigitClassifier` — noise-aware classifier p(y | x_t, t) for classifier guidance, with
  a FiLM time embedding; x_t lives in the VP space of the testbed's DDPM schedule
  (linear betas 1e-4…0.02, 1,000 steps): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

Both take images of shape (B, 1, 16, 16) with values in [-1, 1] (clean) or VP-noised (noisy).
Their architecture has no free settings: the saved safetensors hold only weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DigitClassifier", "NoisyDigitClassifier", "timestep_embedding", "ddpm_alphas_cumprod"]

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def ddpm_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """alpha-bar of the testbed's DDPM linear schedule, float64 (T,), same as diffusers' DDPMScheduler."""
    betas = torch.linspace(BETA_START, BETA_END, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _check_images(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images of shape (B, 1, H, W), got {tuple(x.shape)}")


class DigitClassifier(nn.Module):
    """Clean digit classifier: 4 conv layers (BatchNorm, ReLU), two 2×2 max-pools, a 64-d
    penultimate layer and a linear head.

    ``features(x)``: (B, 1, 16, 16) in [-1, 1] → (B, 64) (ReLU features, ≥ 0).
    ``forward(x)``: → logits (B, 10).
    """

    num_features = 64

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 16 -> 8
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 8 -> 4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: Tensor) -> Tensor:
        """64-d penultimate features, (B, 64) float32."""
        _check_images(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, (B, 10)."""
        return self.head(self.dropout(self.features(x)))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) → (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _FiLMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(8, cout)
        self.film = nn.Linear(emb_dim, 2 * cout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.norm(self.conv(x))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return F.silu(h * (1 + scale) + shift)


class NoisyDigitClassifier(nn.Module):
    """Noise-aware classifier p(y | x_t, t) with FiLM time conditioning.

    ``forward(x_t, t)``: x_t (B, 1, 16, 16) in the VP space of the testbed's DDPM schedule, t the
    DDPM timestep in [0, 1000) as a tensor of shape (B,) or () or a Python number (integer or
    float; fractional timesteps are accepted) → logits (B, 10).
    """

    time_dim = 128

    def __init__(self) -> None:
        super().__init__()
        e = self.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e), nn.SiLU())
        self.blocks = nn.ModuleList([
            _FiLMBlock(1, 32, e), _FiLMBlock(32, 32, e),  # 16×16
            _FiLMBlock(32, 64, e), _FiLMBlock(64, 64, e),  # 8×8
            _FiLMBlock(64, 128, e), _FiLMBlock(128, 128, e),  # 4×4
        ])
        self.head = nn.Sequential(nn.Linear(128 + e, 128), nn.SiLU(), nn.Linear(128, 10))

    def forward(self, x_t: Tensor, t: Tensor | float | int) -> Tensor:
        _check_images(x_t)
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.time_mlp(timestep_embedding(t.reshape(-1), self.time_dim).to(x_t.dtype))
        h = x_t
        for i, blk in enumerate(self.blocks):
            h = blk(h, emb)
            if i in (1, 3):
                h = F.avg_pool2d(h, 2)
        h = h.mean(dim=(2, 3))
        return self.head(torch.cat([h, emb], dim=1))
