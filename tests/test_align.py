"""Soft-token alignment: losses against brute-force formulas, masking of repeated conditions,
zero tokens == no tokens exactly, gradients only on tokens, token files and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from latentgeo.align import (
    attach,
    keep_mask,
    load_tokens,
    new_tokens,
    save_tokens,
    softrepa_loss,
    train_tokens,
)
from latentgeo.align.losses import agsm_loss, agsm_posterior, agsm_targets, condition_ids
from latentgeo.align.tokens import bucket_of
from latentgeo.diffusion import load_model, render
from latentgeo.errors import InputError, ModelError
from tests.tiny_sd import TINY_PIXEL_LATENT, build_tiny_pixel, tiny_pixel_path


@pytest.fixture(scope="module")
def pixel():
    return load_model(str(tiny_pixel_path()))


# -- losses ------------------------------------------------------------------------------------

def brute_softrepa(errors, labels, scale, temp, dweight):
    """Row by row in float64: -log softmax over the columns that are not a repeat."""
    b = len(labels)
    total = 0.0
    for i in range(b):
        cols, seen = [], set()
        for j in range(b):
            if j == i:
                cols.append(j)
            elif labels[j] != labels[i] and labels[j] not in seen:
                cols.append(j)
            if j != i:
                seen.add(labels[j])
        logit = {j: scale * math.exp(-float(errors[i, j]) / temp) for j in cols}
        total += -(logit[i] - math.log(sum(math.exp(v) for v in logit.values())))
    diag = sum(float(errors[i, i]) for i in range(b)) / b
    return total / b + dweight * diag


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [0, 1, 0, 2, 1], [3, 3, 4]])
def test_softrepa_loss_equals_the_formula(labels):
    g = torch.Generator().manual_seed(len(labels))
    b = len(labels)
    errors = torch.rand(b, b, generator=g, dtype=torch.float64) * 0.2
    got = softrepa_loss(errors, condition_ids(labels), 4.0, 0.07, dweight=10.0)
    assert float(got) == pytest.approx(brute_softrepa(errors, labels, 4.0, 0.07, 10.0),
                                       rel=1e-12)


def test_keep_mask_removes_repeats():
    m = keep_mask(condition_ids([0, 1, 0, 2, 1]))
    expect = [[1, 1, 0, 1, 0],   # a 0: itself, the first 1 and the 2
              [1, 1, 0, 1, 0],   # a 1: the first 0, itself, the 2 (the second 0 counts once)
              [0, 1, 1, 1, 0],   # the second 0: the first 0 is its own class, no negative
              [1, 1, 0, 1, 0],   # the 2
              [1, 0, 0, 1, 1]]   # the second 1: the first 1 is no negative
    assert m.tolist() == [[bool(v) for v in row] for row in expect]


def test_a_repeated_class_is_no_negative():
    """Changing the error of a masked (repeat) column leaves the loss unchanged; changing a
    kept negative changes it."""
    labels = [0, 1, 0, 2]
    errors = torch.full((4, 4), 0.1, dtype=torch.float64)
    errors[0, 0] = 0.05
    base = softrepa_loss(errors, condition_ids(labels), 4.0, 0.07)
    moved = errors.clone()
    moved[0, 2] = 0.0  # image 0 under the repeat of its own class
    assert float(softrepa_loss(moved, condition_ids(labels), 4.0, 0.07)) == float(base)
    moved = errors.clone()
    moved[0, 1] = 0.0
    assert float(softrepa_loss(moved, condition_ids(labels), 4.0, 0.07)) > float(base)


def test_softrepa_gradient_reaches_scale_and_temperature():
    errors = torch.rand(3, 3, dtype=torch.float64)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    softrepa_loss(errors, condition_ids([0, 1, 2]), scale, temp).backward()
    assert scale.grad is not None and temp.grad is not None
    assert torch.isfinite(scale.grad) and torch.isfinite(temp.grad)


def test_agsm_targets_equal_the_formula():
    g = torch.Generator().manual_seed(0)
    b, shape = 4, (2, 3)
    labels = [5, 6, 5, 7]
    target = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    ema = target[:, None] + 0.3 * torch.randn(b, b, *shape, generator=g, dtype=torch.float64)
    c4, a_t = 0.7, 1.3
    pos, neg = agsm_targets(target, ema, condition_ids(labels), c4, a_t, 1.0, 0.5)
    keep = keep_mask(condition_ids(labels))
    for i in range(b):
        r = {j: -(a_t / 2) * float(((c4 * (ema[i, j] - target[i])) ** 2).sum())
             for j in range(b) if keep[i, j]}
        z = sum(math.exp(v) for v in r.values())
        mean = sum(math.exp(r[j]) / z * ema[i, j] for j in r)
        delta = ema[i, i] - mean
        torch.testing.assert_close(pos[i], target[i] + delta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(neg[i], target[i] - 0.5 * delta, rtol=1e-12, atol=1e-12)


def test_agsm_no_shift_when_conditions_agree():
    """Equal outputs for every condition: the posterior is uniform and the shift is zero."""
    target = torch.randn(3, 5, dtype=torch.float64)
    ema = (target + 0.1)[:, None].expand(3, 3, 5).clone()
    p = agsm_posterior(ema, target, condition_ids([0, 1, 2]), 1.0)
    torch.testing.assert_close(p, torch.full((3, 3), 1 / 3, dtype=torch.float64))
    pos, neg = agsm_targets(target, ema, condition_ids([0, 1, 2]), 1.0)
    torch.testing.assert_close(pos, target)
    torch.testing.assert_close(neg, target)
    x = torch.zeros(3, 5, dtype=torch.float64)
    assert float(agsm_loss(x, x, pos, neg)) == pytest.approx(2 * float(target.pow(2).mean()))


def test_buckets():
    t = torch.tensor([0, 249, 250, 999, 1000])
    assert bucket_of(t, 4, 1000).tolist() == [0, 0, 1, 3, 3]
    assert bucket_of(t, 1, 1000).tolist() == [0] * 5


# -- tokens on a class-conditional pixel model ---------------------------------------------------

def test_zero_tokens_are_no_tokens_exactly(pixel):
    seeds = torch.randn(4, *TINY_PIXEL_LATENT, generator=torch.Generator().manual_seed(1))
    plain = render(pixel, seeds, [0, 3, 5, 9], steps=4, guidance=2.0)
    uncond = render(pixel, seeds, None, steps=4)
    attach(pixel, new_tokens(pixel, buckets=3))
    try:
        zero = render(pixel, seeds, [0, 3, 5, 9], steps=4, guidance=2.0)
        zero_uncond = render(pixel, seeds, None, steps=4)
    finally:
        attach(pixel, None)
    assert torch.equal(plain, zero) and torch.equal(uncond, zero_uncond)


def test_class_offsets_equal_a_shifted_embedding_table(pixel):
    """Independent check of the hook: offsets == the same UNet with its class-embedding table
    moved by the offsets; both guidance branches (class and null rows) see them."""
    tokens = new_tokens(pixel)
    tokens.values.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, *TINY_PIXEL_LATENT, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(500)
    attach(pixel, tokens)
    try:
        hooked = pixel.model_fn([1, 4, 7], guidance=3.0)(x, t)
    finally:
        attach(pixel, None)
    emb = pixel.unet.class_embedding.weight
    saved = emb.detach().clone()
    with torch.no_grad():
        emb.add_(tokens.values[0])
    try:
        moved = pixel.model_fn([1, 4, 7], guidance=3.0)(x, t)
    finally:
        with torch.no_grad():
            emb.copy_(saved)
    torch.testing.assert_close(hooked, moved, rtol=1e-5, atol=1e-6)


def test_training_moves_only_the_tokens(pixel):
    before = {k: v.clone() for k, v in pixel.unet.state_dict().items()}
    fp = pixel.fingerprint()
    images = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    labels = [i % 4 for i in range(12)]
    for loss in ("softrepa", "agsm"):
        calls: list[tuple] = []
        result = train_tokens(pixel, images, labels, loss=loss, steps=3, batch_size=4,
                              lr=1e-2, buckets=2, callback=lambda *a, c=calls: c.append(a))
        assert [c[0] for c in calls] == [1, 2, 3] and len(result.history) == 3
        assert result.tokens.values.abs().sum() > 0
        assert not result.tokens.values.requires_grad
        assert all(p.grad is None and not p.requires_grad for p in pixel.unet.parameters())
        assert result.tokens.meta["loss"] == loss and result.tokens.meta["fingerprint"] == fp
        assert (result.negative is not None) == (loss == "agsm")
        # null class and unseen classes were never a condition: their rows stay exactly zero
        assert torch.equal(result.tokens.values[:, 4:], torch.zeros_like(
            result.tokens.values[:, 4:]))
    assert all(torch.equal(before[k], v) for k, v in pixel.unet.state_dict().items())
    assert pixel.soft_tokens is None


def test_token_gradient_is_the_finite_difference(pixel):
    """d loss / d token from autograd == central difference (the hook is differentiable)."""
    from latentgeo.align.losses import pair_errors
    from latentgeo.align.train import pair_outputs

    tokens = new_tokens(pixel)
    tokens.values = tokens.values.double()
    x = torch.randn(3, *TINY_PIXEL_LATENT, generator=torch.Generator().manual_seed(5)).double()
    target = torch.randn_like(x)
    t = torch.tensor(300)
    pixel.unet.double()
    pixel.dtype = torch.float64
    try:
        def f(values):
            pixel.soft_tokens = tokens.copy(values)
            out = pair_outputs(pixel, x, t, [0, 1, 2])
            return softrepa_loss(pair_errors(out, target), condition_ids([0, 1, 2]), 4.0, 0.07)

        v = tokens.values.clone().requires_grad_(True)
        f(v).backward()
        h = 1e-6
        for row, col in [(0, 5), (1, 0), (2, 31)]:
            e = torch.zeros_like(v)
            e[0, row, col] = h
            fd = (f(tokens.values + e) - f(tokens.values - e)) / (2 * h)
            assert float(v.grad[0, row, col]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
    finally:
        pixel.soft_tokens = None
        pixel.unet.float()
        pixel.dtype = torch.float32


def test_token_file_round_trip_and_refusal(pixel, tmp_path):
    tokens = new_tokens(pixel, buckets=2)
    tokens.values.normal_(0, 1, generator=torch.Generator().manual_seed(6))
    tokens.meta.update(loss="softrepa", steps="7")
    path = save_tokens(tmp_path / "t.safetensors", tokens)
    back = load_tokens(path)
    assert torch.equal(back.values, tokens.values)
    assert back.meta["loss"] == "softrepa" and back.meta["steps"] == "7"
    assert back.meta["fingerprint"] == pixel.fingerprint() and back.meta["family"] == "pixel"
    assert back.points == ("class_embedding",) and back.buckets == 2
    with pytest.raises(Exception, match="exists"):
        save_tokens(path, tokens)
    other = load_model(str(build_tiny_pixel(tmp_path / "other", steps=4)))
    with torch.no_grad():
        other.unet.conv_out.bias.add_(1.0)
    other._fingerprint = None
    with pytest.raises(ModelError, match="trained for") as e:
        attach(other, back, str(path))
    assert "\n" not in str(e.value)


def test_token_file_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"latent": torch.zeros(2)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(InputError, match="not a latentgeo soft-token file"):
        load_tokens(tmp_path / "l.safetensors")
    (tmp_path / "t.pt").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_tokens(tmp_path / "t.pt")
    with pytest.raises(InputError, match="no such"):
        load_tokens(tmp_path / "missing.safetensors")


def test_refusals(pixel):
    images = torch.rand(4, 1, 16, 16)
    with pytest.raises(InputError, match="loss"):
        train_tokens(pixel, images, [0, 1, 2, 3], loss="nope", steps=1)
    with pytest.raises(InputError, match="same condition"):
        train_tokens(pixel, images, [1, 1, 1, 1], steps=1, batch_size=2)
    with pytest.raises(InputError, match="class 12"):
        train_tokens(pixel, images, [0, 1, 2, 12], steps=1, batch_size=2)


@pytest.mark.parametrize("loss", ["softrepa", "agsm"])
def test_published_tokens_fit_the_bundled_model(loss):
    """The tokens docs/results/align.md measures are accepted by the bundled model as shipped
    (the fingerprint must not depend on where the checkout lives)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = root / "docs" / "results" / "align" / f"{loss}.safetensors"
    backend = load_model("bundled")
    attach(backend, load_tokens(path), loss)
    assert backend.soft_tokens is not None
