"""Radially averaged power spectra (RAPSD) of image sets, and the spectrum files CSFlow reads.

CSFlow (Galinska, Pogodzinski & Lenssen, arXiv 2606.08833) places solver steps with the help of the
data's power spectrum. This module computes that spectrum and reads and writes it:

* :func:`rapsd` -- the mean RAPSD of a batch of images ``(N, H, W)`` or ``(N, C, H, W)``: each image
  (colour images first reduced to luma ``0.299 R + 0.587 G + 0.114 B``; other channel counts,
  such as VAE latents, averaged over the per-channel spectra) goes through a 2-D FFT, its power
  ``|F|^2 / (H W)`` is averaged over rings of radial frequency, and the rings are averaged over the
  images. The rings are ``max(H, W) // 2`` equal bins of ``|f|`` from 0 to the largest radial
  frequency (the corner, about 0.707 cycles per pixel), reported at their centres.
* :func:`load_images` -- images from a folder (PNG, JPEG, ...) or an ``.npz`` array, centre-cropped
  to a common size without resizing, as floats in ``[-1, 1]``.
* :class:`Spectrum`, :func:`load_spectrum`, :func:`save_spectrum` -- the JSON spectrum files
  (fields below), bundled ones by name (:func:`bundled_spectra`).

A spectrum file is a JSON object with ``frequency_cpp`` (bin centres, image cycles per pixel,
strictly increasing, > 0), ``rapsd_data`` (the data's mean RAPSD ``P_d(f)``, > 0) and
``rapsd_noise`` (the RAPSD of the noise the model adds, ``P_n(f)``, > 0; 1 in every bin for
standard-normal noise), all finite and of equal length >= 2, plus provenance: ``name``,
``source``, ``command``, ``date``, ``image_size``, ``num_images`` and ``latent_factor`` (the
VAE's downsampling factor for a spectrum of latents, whose frequencies are then given in image
cycles per pixel: latent frequency / factor; 1 for pixels).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SPECTRA_DIR = Path(__file__).resolve().parent / "spectra"
"""Folder of the bundled spectrum files (``NAME.json``)."""

LUMA = (0.299, 0.587, 0.114)
"""Rec. 601 luma weights of R, G, B."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True, eq=False)
class Spectrum:
    """A data spectrum as CSFlow uses it.

    Attributes:
        frequency_cpp: ``(F,)`` radial bin centres in image cycles per pixel, strictly increasing, > 0.
        rapsd_data: ``(F,)`` the data's mean RAPSD ``P_d(f)``, > 0.
        rapsd_noise: ``(F,)`` the noise's RAPSD ``P_n(f)``, > 0 (1 for standard-normal noise).
        name: a bundled name or the file it was read from.
        provenance: the file's other fields (source, command, date, image size, ...).
    """

    frequency_cpp: np.ndarray
    rapsd_data: np.ndarray
    rapsd_noise: np.ndarray
    name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {}
        for key in ("frequency_cpp", "rapsd_data", "rapsd_noise"):
            try:
                arr = np.asarray(getattr(self, key), dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"spectrum {self.name!r}: {key} must be a list of numbers") from None
            if arr.ndim != 1 or arr.size < 2:
                raise ValueError(f"spectrum {self.name!r}: {key} must be a 1-D list of >= 2 numbers, "
                                 f"got shape {arr.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"spectrum {self.name!r}: {key} holds NaN or inf; every value must be finite")
            if not (arr > 0).all():
                raise ValueError(f"spectrum {self.name!r}: {key} holds zero or negative values; every value "
                                 "must be > 0")
            arrays[key] = arr
        sizes = {k: v.size for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"spectrum {self.name!r}: mismatched lengths {sizes}; the three lists must have "
                             "equal length")
        if not (np.diff(arrays["frequency_cpp"]) > 0).all():
            raise ValueError(f"spectrum {self.name!r}: frequency_cpp must be strictly increasing")
        for key, arr in arrays.items():
            arr.setflags(write=False)
            object.__setattr__(self, key, arr)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object: provenance first, then the three lists."""
        out = {"name": self.name, **{k: v for k, v in self.provenance.items() if k != "name"}}
        out.update(frequency_cpp=self.frequency_cpp.tolist(), rapsd_data=self.rapsd_data.tolist(),
                   rapsd_noise=self.rapsd_noise.tolist())
        return out


def bundled_spectra() -> list[str]:
    """Names of the bundled spectrum files (``diffsample/solvers/spectra/NAME.json``), sorted."""
    return sorted(p.stem for p in SPECTRA_DIR.glob("*.json"))


def load_spectrum(spectrum: str | os.PathLike) -> Spectrum:
    """A bundled spectrum by name (:func:`bundled_spectra`) or a spectrum JSON file (module docstring).

    Raises:
        ValueError: an unknown name that is no file (listing the bundled names), a file that is not
            JSON or misses a list, lists with NaN / inf / zero / negative values, mismatched lengths
            or decreasing frequencies (each message names the spectrum).
    """
    text = str(spectrum)
    path = SPECTRA_DIR / f"{text}.json" if text in bundled_spectra() else Path(text)
    if not path.is_file():
        raise ValueError(f"spectrum {text!r} is neither a bundled spectrum nor a file; bundled: "
                         f"{', '.join(bundled_spectra())}")
    from diffsample.core.files import read_json

    try:  # a regular UTF-8 file of at most 16 MiB, nested at most 64 deep
        data = read_json(path, "spectrum file")
    except (OSError, ValueError) as exc:
        raise ValueError(f"spectrum {text!r}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"spectrum {text!r}: expected a JSON object with frequency_cpp, rapsd_data, rapsd_noise")
    missing = [k for k in ("frequency_cpp", "rapsd_data", "rapsd_noise") if k not in data]
    if missing:
        raise ValueError(f"spectrum {text!r}: missing {', '.join(missing)}; a spectrum file needs frequency_cpp, "
                         "rapsd_data and rapsd_noise")
    provenance = {k: v for k, v in data.items() if k not in ("frequency_cpp", "rapsd_data", "rapsd_noise")}
    return Spectrum(data["frequency_cpp"], data["rapsd_data"], data["rapsd_noise"], name=text, provenance=provenance)


def save_spectrum(spectrum: Spectrum, path: str | os.PathLike) -> Path:
    """Write ``spectrum`` as JSON to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spectrum.to_json(), indent=1) + "\n")
    return path


def radial_bins(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Ring index of every frequency of an ``h x w`` FFT (unshifted layout) and the ring centres.

    Returns:
        ``(index, centres)``: ``index`` of shape ``(h, w)`` with values in ``0 .. nb - 1`` and
        ``centres`` of shape ``(nb,)`` in cycles per pixel, ``nb = max(h, w) // 2`` rings of equal
        width from 0 to the largest radial frequency (a frequency on an edge goes to the lower ring;
        0 goes to the first).
    """
    fy, fx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    nb = max(h, w) // 2
    if nb < 1:
        raise ValueError(f"images must be at least 2 pixels on a side, got {h}x{w}")
    edges = np.linspace(0.0, radius.max(), nb + 1)
    index = np.clip(np.searchsorted(edges, radius, side="left") - 1, 0, nb - 1)
    return index, 0.5 * (edges[:-1] + edges[1:])


def rapsd(images: Tensor | np.ndarray, channels: str = "auto", batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Mean radially averaged power spectral density of ``images`` (module docstring).

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)``, any real dtype (values as given, e.g. in [-1, 1]).
        channels: ``"auto"`` (1 channel as is, 3 channels to luma, others averaged), ``"luma"``
            (needs 3 channels) or ``"mean"`` (the per-channel spectra averaged, e.g. VAE latents).
        batch_size: images per FFT batch.

    Returns:
        ``(frequency_cpp, rapsd_data)``, both of shape ``(max(H, W) // 2,)``, float64.

    Raises:
        ValueError: a shape other than 3-D / 4-D, no images, ``channels`` unknown or ``"luma"`` on
            other than 3 channels, non-finite values.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images).detach()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must have shape (N, H, W) or (N, C, H, W) with N >= 1, got {tuple(x.shape)}")
    if channels not in ("auto", "luma", "mean"):
        raise ValueError(f"channels must be 'auto', 'luma' or 'mean', got {channels!r}")
    c = x.shape[1]
    if channels == "luma" and c != 3:
        raise ValueError(f"channels='luma' needs 3 channels, got {c}")
    to_luma = c == 3 and channels in ("auto", "luma")
    h, w = x.shape[-2:]
    index, centres = radial_bins(h, w)
    flat = torch.as_tensor(index.reshape(-1), dtype=torch.long)
    counts = torch.bincount(flat, minlength=centres.size).to(torch.float64).clamp_min(1.0)
    total = torch.zeros(centres.size, dtype=torch.float64)
    for lo in range(0, x.shape[0], batch_size):
        b = x[lo:lo + batch_size].to(torch.float64)
        if not torch.isfinite(b).all():
            raise ValueError("images hold NaN or inf values")
        if to_luma:
            b = (LUMA[0] * b[:, 0] + LUMA[1] * b[:, 1] + LUMA[2] * b[:, 2])[:, None]
        power = torch.fft.fft2(b).abs() ** 2 / (h * w)  # (B, C', H, W)
        power = power.mean(dim=1).reshape(power.shape[0], -1)  # channel mean of the spectra
        sums = torch.zeros(power.shape[0], centres.size, dtype=torch.float64).index_add_(1, flat, power)
        total += (sums / counts).sum(dim=0)
    return centres, (total / x.shape[0]).numpy()


def spectrum_from_images(images: Tensor | np.ndarray, name: str = "", channels: str = "auto",
                         latent_factor: int = 1, **provenance: Any) -> Spectrum:
    """A :class:`Spectrum` of ``images`` (:func:`rapsd`), with ``P_n = 1`` in every bin (the exact RAPSD
    of standard-normal noise) and the frequencies divided by ``latent_factor`` (image cycles per
    pixel for VAE latents; 1 for pixels). ``provenance`` goes into the file (source, command, ...).

    Raises:
        ValueError: as :func:`rapsd`; ``latent_factor < 1``; a bin without power (constant images).
    """
    if isinstance(latent_factor, bool) or not isinstance(latent_factor, int) or latent_factor < 1:
        raise ValueError(f"latent_factor must be an integer >= 1, got {latent_factor!r}")
    freq, power = rapsd(images, channels=channels)
    shape = tuple(np.shape(images))
    info = {"image_size": int(shape[-1]) * latent_factor, "num_images": int(shape[0]), "latent_factor": latent_factor,
            "rapsd_noise_note": "exact expectation for standard-normal noise (1 in every bin)", **provenance}
    return Spectrum(freq / latent_factor, power, np.ones_like(power), name=name, provenance=info)


def load_images(path: str | os.PathLike, resolution: int | None = None, max_images: int | None = None,
                key: str | None = None) -> Tensor:
    """Images from a folder of image files or an ``.npz`` file, as ``(N, C, R, R)`` float32 in [-1, 1].

    Images are centre-cropped to ``R x R`` without resizing (``R = resolution``, default: the
    smallest side among them). Folder files (sorted by name; PNG, JPEG, BMP, WebP, TIFF) are read as
    greyscale when every one is greyscale, else as RGB, and scaled from [0, 255]. An ``.npz`` array
    (``key``, default: the first) of shape ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``
    (C in 1, 3, 4 with channels last or first) is scaled from [0, 255] when it is uint8 and taken
    as [-1, 1] when it is floating point.

    Raises:
        ValueError: a missing path, no images, an unknown ``key``, an array of another shape, an
            image smaller than ``resolution``, ``resolution`` / ``max_images`` < 1.
    """
    path = Path(path)
    for label, value in (("resolution", resolution), ("max_images", max_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {str(path)!r}")
        arrays = _read_image_files(files)
    elif path.is_file() and path.suffix.lower() == ".npz":
        arrays = _read_npz(path, key, max_images)
    else:
        raise ValueError(f"images {str(path)!r}: not a folder of images or an .npz file")
    smallest = min(min(a.shape[-2:]) for a in arrays)
    r = smallest if resolution is None else resolution
    if r > smallest:
        raise ValueError(f"resolution {r} is larger than the smallest image side {smallest}; choose <= {smallest}")
    crops = []
    for a in arrays:
        h, w = a.shape[-2:]
        top, left = (h - r) // 2, (w - r) // 2  # torchvision CenterCrop's rounding
        crops.append(a[..., top:top + r, left:left + r])
    return torch.as_tensor(np.stack(crops), dtype=torch.float32)


def _read_image_files(files: list[Path]) -> list[np.ndarray]:
    from PIL import Image

    images = [Image.open(f) for f in files]
    grey = all(im.mode in ("L", "I", "I;16", "1") for im in images)
    out = []
    for im in images:
        arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32) / 127.5 - 1.0
        out.append(arr[None] if grey else arr.transpose(2, 0, 1))
    return out


def _read_npz(path: Path, key: str | None, max_images: int | None) -> list[np.ndarray]:
    with np.load(path) as data:
        keys = list(data.keys())
        if not keys:
            raise ValueError(f"{str(path)!r} holds no arrays")
        if key is not None and key not in keys:
            raise ValueError(f"{str(path)!r} has no array {key!r}; arrays: {', '.join(keys)}")
        arr = data[key or keys[0]][:max_images]
    floating = np.issubdtype(arr.dtype, np.floating)
    if arr.dtype != np.uint8 and not floating:
        raise ValueError(f"{str(path)!r}: array dtype {arr.dtype} is neither uint8 ([0, 255]) nor float ([-1, 1])")
    arr = arr.astype(np.float32)
    if not floating:
        arr = arr / 127.5 - 1.0
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3, 4) or arr.shape[0] == 0:
        raise ValueError(f"{str(path)!r}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4; "
                         f"got {arr.shape}")
    if arr.shape[1] == 4:
        arr = arr[:, :3]  # drop alpha
    return list(arr)
