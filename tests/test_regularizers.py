"""Regularisers: one signature, floors on noise, finite gradients, and the layout deviation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentgeo.errors import InputError
from latentgeo.regularizers import (
    RANDOMISED,
    RAYLEIGH_MEAN,
    REGULARIZERS,
    _autocovariance,
    dno,
    get_regularizer,
    mpgr,
    spectral,
)
from tests.test_gaussianity import blurred, checkerboard

SHAPE = (4, 32, 32)
NAMES = [n for n in REGULARIZERS if n != "none"]


def _shape(name):
    """covariance is O(d^2) by design: test it on a smaller latent."""
    return (4, 16, 16) if name == "covariance" else SHAPE


def _noise(seed, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_registry_and_unknown_name():
    assert set(REGULARIZERS) == {"moment", "spectral", "moment+spectral", "kl", "kurtosis",
                                 "norm", "covariance", "dno", "mpgr", "none"}
    with pytest.raises(InputError, match="moment\\+spectral"):
        get_regularizer("nope")


@pytest.mark.parametrize("name", list(REGULARIZERS))
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
          "dno": lambda z: 0.8 * z, "mpgr": lambda z: 0.5 * z,
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


# --- dno and mpgr against independent numpy transcriptions of their definitions ---------------

def _dno_numpy(x, k, perms):
    """DNO's compute_probability_regularization, transcribed in numpy (float64)."""
    def log_p(v):
        n = len(v) // k
        b = v[: n * k].reshape(n, k)
        m = b.mean(0)
        c = b.T @ b / n
        dev = np.linalg.norm(c - np.eye(k), 2)
        lm = min(-n * m @ m / (2 * k), -np.log(2))
        ex = max(np.sqrt(1 + dev) - 1 - np.sqrt(k / n), 0.0)
        lc = min(-n * ex ** 2 / 2, -np.log(2))
        return lm + lc
    total = log_p(x)
    if perms:
        total += np.mean([log_p(x[p]) for p in perms])
    return -total


def _perms(n, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g).numpy() for _ in range(count)]


@pytest.mark.parametrize("scale", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 6, 6), (3, 5, 7)])
def test_dno_matches_numpy_transcription(scale, shape):
    z = scale * _noise(5, shape, torch.float64) + (0.3 if scale > 1 else 0.0)
    got = dno(z, permutations=7, seed=11)
    want = _dno_numpy(z.flatten().numpy(), 4, _perms(z.numel(), 7, 11))
    assert abs(float(got) - want) < 1e-10


def test_dno_floor_bounds_and_generator():
    z = _noise(2, (1, 32, 32), torch.float64)
    # Noise sits on the clamped floor 4 log 2 most of the time; a shrunk latent is penalised.
    assert float(dno(z)) >= 4 * np.log(2) - 1e-12
    assert float(dno(0.5 * z)) > 4 * np.log(2) + 5
    # Natural order only: permutations=0; a shifted mean shows in log p_mean.
    shifted = z + 0.5
    n, k = z.numel() // 4, 4
    lm = -n * (shifted.flatten().view(n, k).mean(0) ** 2).sum() / (2 * k)
    assert float(dno(shifted, permutations=0)) >= -float(lm) + np.log(2) - 1e-9
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert float(dno(0.7 * z, generator=g1)) == float(dno(0.7 * z, generator=g2))
    assert float(dno(0.7 * z, seed=0)) == float(dno(0.7 * z))


def _mpgr_numpy(x, perm, block=16, weight=25.0):
    """The paper's MPGR, transcribed in numpy: moments {1, 2} + 25 * permuted DFT blocks."""
    d = len(x)
    mom = abs(abs(x.mean()) - 0.0) + abs(np.sqrt(abs((x * x).mean())) - 1.0)
    mag = np.abs(np.fft.fft(x[perm])) / np.sqrt(d)
    blocks = [mag[i:i + block].mean() for i in range(0, d, block)]
    spec = np.mean([abs(b - np.sqrt(np.pi) / 2) for b in blocks])
    return mom + weight * spec


@pytest.mark.parametrize("shape", [(1, 16, 16), (4, 8, 8), (2, 5, 9)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_mpgr_matches_numpy_transcription(shape, scale):
    z = scale * _noise(9, shape, torch.float64)
    got = mpgr(z, seed=4)
    want = _mpgr_numpy(z.flatten().numpy(), _perms(z.numel(), 1, 4)[0])
    assert abs(float(got) - want) < 1e-7  # the safe root/abs epsilons


def test_mpgr_properties():
    assert abs(RAYLEIGH_MEAN - 0.8862269) < 1e-6  # sqrt(pi)/2 (not 0.875)
    z = _noise(1, (1, 32, 32), torch.float64)
    # A shrunk latent is penalised by both the second moment and the spectral blocks.
    assert float(mpgr(0.5 * z)) > 3 * float(mpgr(z))
    # Only the permutation is random: a permuted latent has the same distribution of values.
    perm = torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))
    vals = [float(mpgr(z, seed=s)) for s in range(20)]
    vals_p = [float(mpgr(z.flatten()[perm], seed=s)) for s in range(20)]
    assert abs(np.mean(vals) - np.mean(vals_p)) < 4 * np.std(vals) / np.sqrt(20) * 2


def test_randomised_set():
    assert RANDOMISED == {"dno", "mpgr"}
    assert float(REGULARIZERS["none"](torch.randn(3, 4, 4))) == 0.0
