"""The FID Inception-v3 network (pool3, 2048-d features) in plain torch, weights from a local file.

FID (Heusel et al., arXiv 1706.08500) is the Fréchet distance between Gaussians fitted to the
2048-d pool3 features of the Inception-v3 graph TensorFlow published on 2015-12-05 (arXiv
1512.00567). pytorch-fid and torch-fidelity port that graph to torch; its blocks differ from the
later Inception-v3 in two places: the average pools inside the blocks exclude padding from the
mean, and the last block pools its side branch with a max pool. This module writes that
architecture out (layer names as in pytorch-fid's ``pt_inception-2015-12-05`` weights, so its
state dict loads as is) and needs neither torchvision nor torch-fidelity. It is written here from
the architecture (torchvision's Inception3 blocks with those two changes), not copied; the layer
names, the two changes and the input handling follow pytorch-fid (M. Seitzer, Apache-2.0).

Input: ``(B, 3, H, W)`` (or ``(B, 1, H, W)``, repeated to three channels) in [0, 1]; resized to
299 x 299 bilinearly (``align_corners=False``, as pytorch-fid), mapped to [-1, 1]; output
``(B, 2048)`` float64. ``num_features = 2048`` makes it a feature module of
``torchmetrics.image.fid.FrechetInceptionDistance``.

Weights are read only from a local safetensors file (:func:`load_fid_inception`); nothing is ever
downloaded and no pickle is ever loaded. To make that file once from pytorch-fid's released
``pt_inception-2015-12-05-6726825d.pth`` (on your own machine, with a torch you trust)::

    import torch; from safetensors.torch import save_file
    sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, "pt_inception-2015-12-05.safetensors")
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FIDInceptionV3", "load_fid_inception", "FID_SIZE", "FID_FEATURES"]

FID_SIZE = 299
"""Side of the square the images are resized to."""
FID_FEATURES = 2048
"""Dimension of the pool3 features."""
IGNORED_KEYS = ("fc.weight", "fc.bias")
"""Tensors of the released file this network does not use (the 1008-way classifier); also every
``*.num_batches_tracked``."""


class _Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: pytorch-fid's ``BasicConv2d``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: Tensor) -> Tensor:
    # The TF graph averages over the valid pixels only.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b..5d
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class _BlockB(nn.Module):  # Mixed_6a: grid 35 -> 17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b..6e: factorised 7x7
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a: grid 17 -> 8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool): expanded 3x3
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """The 2015-12-05 Inception-v3 graph up to pool3 (arXiv 1512.00567, Fig. 5-7 and Table 1).

    ``forward(x)``: ``(B, 3 or 1, H, W)`` in [0, 1] -> ``(B, 2048)`` float64 (eval mode, no grad).
    Freshly built it has random weights; use :func:`load_fid_inception`.
    """

    num_features = FID_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 3, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
        x = x.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3)).to(torch.float64)


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


def load_fid_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """The FID network with the weights of the local safetensors file ``path``.

    The file holds pytorch-fid's state-dict names (``Conv2d_1a_3x3.conv.weight``,
    ``Mixed_7c.branch_pool.bn.running_var``, ...); its ``fc.*`` classifier and
    ``*.num_batches_tracked`` counters, if present, are ignored. See the module docstring for the
    one-time conversion of the released ``.pth``.

    Raises:
        ValueError: ``path`` is not a file; not a safetensors file; a tensor of the network is
            missing or has another shape, or the file holds a tensor the network does not have
            (the first such name is given).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"FID Inception weights {os.fspath(path)!r}: no such file (nothing is downloaded; "
                         "see docs/sweeps.md for making the safetensors file)")
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"FID Inception weights {os.fspath(path)!r}: not a safetensors file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    net = FIDInceptionV3()
    expected = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    for name, value in expected.items():
        if name not in tensors:
            raise ValueError(f"FID Inception weights {os.fspath(path)!r}: tensor {name!r} missing")
        if _shape(tensors[name].shape) != _shape(value.shape):
            raise ValueError(f"FID Inception weights {os.fspath(path)!r}: tensor {name!r} has shape "
                             f"{_shape(tensors[name].shape)}, expected {_shape(value.shape)}")
    for name in tensors:
        if name not in expected and name not in IGNORED_KEYS and not name.endswith("num_batches_tracked"):
            raise ValueError(f"FID Inception weights {os.fspath(path)!r}: unexpected tensor {name!r} "
                             "(not pytorch-fid's 2015-12-05 Inception-v3)")
    net.load_state_dict({k: tensors[k].to(torch.float32) for k in expected}, strict=False)
    return net.eval()
