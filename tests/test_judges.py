"""The two shipped digit judges: A (target reward, as first shipped) and B (held-out reward).

Judge B must be a different architecture and seed, trained on the even half of the training
digits only, as accurate and as calibrated as the acceptance bars ask, and differentiable to
its input (the optimiser's rewards flow through it).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from latentgeo.classifier import (
    CLASSIFIER_DIR,
    JUDGE_B_DIR,
    DigitClassifier,
    WideDigitClassifier,
    build_classifier,
    expected_calibration_error,
    load_classifier,
    load_judge,
)
from latentgeo.data import load_mnist_split
from latentgeo.errors import ModelError, ShapeError

#: sha256 of judge A's weights as first shipped: its figures stand only if they never change.
JUDGE_A_SHA256 = "46dfd70789de8cdeb5fded6495f9ec076aeaa0e28a6c7b492bc7db3a7b021c41"


@pytest.fixture(scope="module")
def split():
    return load_mnist_split()


@pytest.fixture(scope="module")
def judges():
    return {"a": load_judge("a"), "b": load_judge("b")}


@pytest.fixture(scope="module")
def heldout_probs(judges, split):
    with torch.no_grad():
        return {k: m(split.heldout_images).softmax(1) for k, m in judges.items()}


def test_judge_a_weights_are_as_shipped(judges):
    digest = hashlib.sha256((CLASSIFIER_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert digest == JUDGE_A_SHA256
    # the old loader and the new one give the same judge A
    old = load_classifier()
    assert isinstance(judges["a"], DigitClassifier)
    for (k, v), (k2, v2) in zip(old.state_dict().items(), judges["a"].state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_judge_b_loads(judges):
    b = judges["b"]
    assert isinstance(b, WideDigitClassifier) and not b.training
    config = json.loads((JUDGE_B_DIR / "config.json").read_text())
    assert config["arch"] == "wide"
    assert (JUDGE_B_DIR / "model.safetensors").stat().st_size < 2**20
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(b(x), b(x))
        assert b.features(x).shape == (4, b.config["feature_dim"])
    with pytest.raises(ShapeError, match=r"\(N, 1, 32, 32\)"):
        b(torch.zeros(2, 1, 28, 28))


def test_unknown_judge_or_architecture_is_refused(tmp_path):
    with pytest.raises(ModelError, match="unknown judge 'c'; known: a, b"):
        load_judge("c")
    with pytest.raises(ModelError, match="unknown classifier architecture 'vit'; known: cnn"):
        build_classifier({"arch": "vit"})
    with pytest.raises(ModelError, match="cannot load the digit classifier"):
        load_classifier(path=tmp_path)


def test_judges_are_different_architectures_seeds_and_data(judges):
    a, b = judges["a"], judges["b"]
    assert type(a) is not type(b)
    kinds_a = {type(m) for m in a.modules()}
    kinds_b = {type(m) for m in b.modules()}
    assert {nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU} <= kinds_a
    assert {nn.GroupNorm, nn.AvgPool2d, nn.GELU} <= kinds_b
    assert not {nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU} & kinds_b
    convs_a = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    convs_b = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs_a) == 6 and len(convs_b) == 2
    assert {m.kernel_size for m in convs_a} == {(3, 3)}
    assert {m.kernel_size for m in convs_b} == {(5, 5)}
    train_a = json.loads((CLASSIFIER_DIR / "config.json").read_text())["training"]
    train_b = json.loads((JUDGE_B_DIR / "config.json").read_text())["training"]
    assert train_a["seed"] != train_b["seed"]
    assert train_a["train_images"] == 4500
    assert train_b["subset"] == "even" and train_b["train_images"] == 2250
    assert train_b["command"].startswith("python scripts/train_classifier.py --arch wide")


def test_even_half_is_balanced_and_disjoint(split):
    """The even half judge B trains on: 2,250 digits, every class present, no held-out digit."""
    even = split.train_index[0::2]
    assert len(even) == 2250 and not set(even) & set(split.heldout_index)
    counts = torch.bincount(split.train_labels[0::2], minlength=10)
    assert int(counts.min()) >= 200, counts


@pytest.mark.parametrize("name", ["a", "b"])
def test_judge_accuracy_and_calibration(name, heldout_probs, split):
    """Judge A: 98.8% (bar 98%, as in test_bundled_model). Judge B: 98.6% measured when
    shipped, bar 97.5%. Both calibrated (ECE <= 0.03) and confident on real digits (>= 95%
    of the 500 held-out digits at max-probability >= 0.9), as the acceptance bar needs."""
    conf, pred = heldout_probs[name].max(1)
    correct = pred == split.heldout_labels
    acc = float(correct.float().mean())
    assert acc >= {"a": 0.98, "b": 0.975}[name], acc
    assert float((conf >= 0.9).float().mean()) >= 0.95
    assert expected_calibration_error(conf, correct) <= 0.03


@pytest.mark.parametrize("name, folder", [("a", CLASSIFIER_DIR), ("b", JUDGE_B_DIR)])
def test_recorded_figures_match(name, folder, heldout_probs, split):
    """config.json's figures are what the shipped weights give here."""
    config = json.loads((folder / "config.json").read_text())
    conf, pred = heldout_probs[name].max(1)
    correct = pred == split.heldout_labels
    assert float(correct.float().mean()) == pytest.approx(config["heldout_accuracy"], abs=1e-3)
    assert float((conf >= 0.9).float().mean()) == pytest.approx(
        config["heldout_maxprob_ge_0.9"], abs=1e-3)
    assert expected_calibration_error(conf, correct) == pytest.approx(
        config["heldout_ece"], abs=1e-3)


def test_judge_b_on_the_half_it_never_saw(judges, split):
    """The odd half of the training digits is a second held-out set for judge B."""
    config = json.loads((JUDGE_B_DIR / "config.json").read_text())
    with torch.no_grad():
        pred = judges["b"](split.train_images[1::2]).argmax(1)
    acc = float((pred == split.train_labels[1::2]).float().mean())
    assert acc == pytest.approx(config["unseen_half_accuracy"], abs=1e-3)
    assert acc >= 0.975, acc


def test_agreement_between_judges(heldout_probs, split):
    """Reported: A and B agree on 98.2% of the held-out digits (recorded in B's config)."""
    pred_a, pred_b = heldout_probs["a"].argmax(1), heldout_probs["b"].argmax(1)
    agree = float((pred_a == pred_b).float().mean())
    config = json.loads((JUDGE_B_DIR / "config.json").read_text())
    print(f"judges A and B agree on {agree:.1%} of the 500 held-out digits")
    assert agree == pytest.approx(config["heldout_agreement_with_judge_a"], abs=1e-3)
    assert agree >= 0.95
    # where they disagree, at least one of them is wrong
    differ = pred_a != pred_b
    wrong = (pred_a != split.heldout_labels) | (pred_b != split.heldout_labels)
    assert bool((wrong[differ]).all())


@pytest.mark.parametrize("name", ["a", "b"])
def test_log_prob_is_normalised_log_softmax(name, judges):
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lp = judges[name].log_prob(x)
        logits = judges[name](x)
    assert lp.shape == (5, 10)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(5))
    torch.testing.assert_close(lp, logits - logits.logsumexp(1, keepdim=True))


@pytest.mark.parametrize("name", ["a", "b"])
def test_gradient_reaches_the_input(name, judges, split):
    """d log p(c | x) / dx is finite and nonzero on real digits, and matches a central
    difference along a random direction in float64 (the judge copied to float64) at digits
    with a little noise added: on a flat zero background judge A's max-pool windows tie, a
    point where the function has no derivative to check."""
    judge = judges[name]
    x = split.heldout_images[:3].clone().requires_grad_(True)
    target = torch.tensor([3, 7, 1])
    judge.log_prob(x)[torch.arange(3), target].sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert bool((x.grad.flatten(1).abs().sum(1) > 0).all())
    judge.zero_grad(set_to_none=True)

    j64 = load_judge(name).double()
    gen = torch.Generator().manual_seed(3)
    noise = torch.rand(3, 1, 32, 32, generator=gen, dtype=torch.float64)
    x64 = (0.9 * split.heldout_images[:3].double() + 0.1 * noise).requires_grad_(True)
    v = torch.randn(x64.shape, generator=gen, dtype=torch.float64)

    def f(z):
        return j64.log_prob(z)[torch.arange(3), target].sum()

    (g,) = torch.autograd.grad(f(x64), x64)
    h = 1e-7  # small: judge A's ReLU / max-pool switch within 1e-5 along v; float64 copes
    with torch.no_grad():
        fd = (f(x64 + h * v) - f(x64 - h * v)) / (2 * h)
    assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)


def test_judge_b_batched_equals_looped(judges, split):
    """GroupNorm keeps no batch statistics: a batch is judged as its images one at a time."""
    x = split.heldout_images[:6]
    with torch.no_grad():
        batch = judges["b"](x)
        loop = torch.cat([judges["b"](x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(batch, loop, rtol=1e-5, atol=1e-5)
