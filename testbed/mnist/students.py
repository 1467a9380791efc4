"""The bundled few-step students of the MNIST teacher: where their weights live and how they load.

Each student is one float16 safetensors file ``weights/<name>.safetensors`` written by
:mod:`diffsample.testbed.mnist.distill`: the teacher's ``UNet2DModel`` architecture read as a
**v-prediction** network, keys ``step{k}.<parameter>`` (one parameter set per grid step for a
step-decoupled student, ``step0`` only for a shared-weight one), and metadata giving the
prediction type, the grid (diffusers timesteps, noisiest first; the run ends at sigma = 0) and the
recipe. Recipe, cost and measured quality: ``weights/MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffsample.testbed.mnist.loaders import WEIGHTS_DIR

STUDENT_DIR: Path = WEIGHTS_DIR
"""Folder holding the student files (tests point it elsewhere to check bad files)."""


@dataclass(frozen=True)
class StudentInfo:
    """What a student is, without loading it.

    Attributes:
        name: bundled model name (``mnist-pd-4``).
        grid: diffusers timesteps it was distilled for, noisiest first (= diffsample's ``trailing``
            grid of ``len(grid)`` steps); the run ends at sigma = 0.
        networks: parameter sets (1: shared weights; ``len(grid)``: one per step).
        summary: one line for ``diffsample list models``.
    """

    name: str
    grid: tuple[float, ...]
    networks: int
    summary: str

    @property
    def steps(self) -> int:
        return len(self.grid)

    @property
    def path(self) -> Path:
        return STUDENT_DIR / f"{self.name}.safetensors"


STUDENTS: dict[str, StudentInfo] = {
    "mnist-pd-4": StudentInfo("mnist-pd-4", (999.0, 749.0, 499.0, 249.0), 1,
                              "4-step progressive-distillation student (arXiv 2202.00512), v-prediction"),
    "mnist-pd-2": StudentInfo("mnist-pd-2", (999.0, 499.0), 1,
                              "2-step progressive-distillation student, shared weights"),
    "mnist-decoupled-2": StudentInfo("mnist-decoupled-2", (999.0, 499.0), 2,
                                     "2-step student with step-decoupled weights, one network per step "
                                     "(arXiv 2606.12575)"),
    "mnist-mfd-1": StudentInfo("mnist-mfd-1", (999.0,), 1,
                               "1-step student regressing the mean velocity over [0, T] of a 2-step sampler "
                               "(single-interval reduction of arXiv 2606.11155)"),
}
"""The bundled students by name."""


def _fail(info: StudentInfo, why: str) -> ValueError:
    return ValueError(f"student weights {str(info.path)!r} {why}; rebuild them with `OMP_NUM_THREADS=1 python -m "
                      "diffsample.testbed.mnist.distill --out <folder>`")


def load_student_unets(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list:
    """The student's networks (``UNet2DModel``, eval mode, no gradients), one per parameter set.

    Call each as ``unet(x_t, t, class_labels=y).sample`` (x_t (B, 1, 16, 16), t diffusers timesteps,
    y in 0..9 or 10 = unconditional); the output is **v** (``denoised = alpha x_t - sigma v``).

    Raises:
        ValueError: unknown name (listing the students); the file is missing, not a safetensors
            file, or lacks the parameter sets its entry names (one line each).
    """
    from diffusers import UNet2DModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from diffsample.testbed.mnist.loaders import MODEL_DIR

    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; valid: {', '.join(STUDENTS)}")
    info = STUDENTS[name]
    if not info.path.is_file():
        raise _fail(info, "is missing")
    try:
        tensors = load_file(str(info.path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(info, f"is not a readable safetensors file ({' '.join(str(exc).split())[:120]})") from None
    config = json.loads((MODEL_DIR / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unets = []
    for k in range(info.networks):
        prefix = f"step{k}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        unet = UNet2DModel(**config)
        try:
            unet.load_state_dict({key: value.to(torch.float32) for key, value in state.items()})
        except RuntimeError as exc:
            raise _fail(info, f"does not hold the parameter set {prefix}* of a {info.networks}-network student "
                              f"({' '.join(str(exc).split())[:120]})") from None
        unet = unet.to(device=device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
        unets.append(unet.eval().requires_grad_(False))
    return unets
