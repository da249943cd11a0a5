"""Regularisers: one signature, floors on noise, finite gradients, and the layout deviation."""

from __future__ import annotations

import pytest
import torch

from latentgeo.errors import InputError
from latentgeo.regularizers import REGULARIZERS, _autocovariance, get_regularizer, spectral
from tests.test_gaussianity import blurred, checkerboard

SHAPE = (4, 32, 32)
NAMES = list(REGULARIZERS)


def _shape(name):
    """covariance is O(d^2) by design: test it on a smaller latent."""
    return (4, 16, 16) if name == "covariance" else SHAPE


def _noise(seed, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_registry_and_unknown_name():
    assert set(NAMES) == {"moment", "spectral", "moment+spectral", "kl", "kurtosis", "norm",
                          "covariance"}
    with pytest.raises(InputError, match="moment\\+spectral"):
        get_regularizer("nope")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_and_finite_gradients_everywhere(name, dtype):
    f, shape = REGULARIZERS[name], _shape(name)
    for z in (torch.zeros(shape, dtype=dtype), _noise(0, shape, dtype), checkerboard(shape)
              .to(dtype), 1e3 * _noise(1, shape, dtype)):
        x = z.clone().requires_grad_(True)
        value = f(x)
        assert value.ndim == 0 and value.dtype == dtype and torch.isfinite(value)
        value.backward()
        assert torch.isfinite(x.grad).all(), name


# The defect each regulariser is built to see (the baselines are blind to spatial structure).
DEFECT = {"moment": lambda z: 0.5 * z, "kl": lambda z: 0.8 * z, "norm": lambda z: 0.8 * z,
          "kurtosis": lambda z: z.sign() * z.abs() ** 1.5,
          "spectral": None, "moment+spectral": None, "covariance": None}  # blurred field


@pytest.mark.parametrize("name", NAMES)
def test_noise_sits_at_the_floor(name):
    """On fresh noise the value is at its floor (spread of noise values) and far below a defect."""
    f, shape = REGULARIZERS[name], _shape(name)
    values = torch.stack([f(_noise(s, shape)) for s in range(8)])
    floor, spread = values.mean(), values.std()
    z = _noise(100, shape)
    assert abs(f(z) - floor) <= 4 * spread + 1e-12
    bad = f(DEFECT[name](z) if name not in ("spectral", "moment+spectral", "covariance")
            else blurred(shape))
    assert bad > floor + 10 * spread, (name, float(bad), float(floor), float(spread))


def test_closed_form_floors():
    z = _noise(3, shape=(4, 64, 64), dtype=torch.float64)
    d = z.numel()
    assert REGULARIZERS["kl"](z) < 10 / d
    assert REGULARIZERS["kurtosis"](z) < 10 * 30 / d
    assert REGULARIZERS["norm"](z) < 5  # ~ (|z| - sqrt(d-1))^2, mean ~0.5
    assert REGULARIZERS["norm"](torch.full((d,), (d - 1) ** 0.5 / d ** 0.5)) < 1e-6
    assert abs(float(spectral(z)) - 0.29) < 0.05


def test_autocovariance_is_the_fft_one():
    x = torch.randn(6, 5, dtype=torch.float64)
    ref = torch.fft.ifft2(torch.fft.fft2(x).abs() ** 2).real / x.numel()
    torch.testing.assert_close(_autocovariance(x), ref)


def test_shuffled_spectral_loss_misses_blur_natural_layout_sees_it():
    """Deviation from the paper: shuffling before the FFT hides spatial structure."""
    shape = (4, 64, 64)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    for layout in ("shuffled", "natural"):
        vals = torch.stack([spectral(z, layout=layout) for z in noise])
        floor, spread = vals.mean(), vals.std()
        value = spectral(blurred(shape), layout=layout)
        if layout == "shuffled":
            assert abs(value - floor) <= 4 * spread  # the blurred field passes
        else:
            assert value > floor + 20 * spread  # ours fails it
    # Extra shuffled views keep the natural term's verdict.
    assert spectral(blurred(shape), views=2) > 2 * spectral(noise[0], views=2)
