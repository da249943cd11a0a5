"""The shipped model folder and classifier: loadable offline, consistent configs, accurate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import latentgeo

BUNDLED = Path(latentgeo.__file__).resolve().parent / "bundled"
DIGITS = BUNDLED / "digits"


def test_pipeline_folder_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline, UNet2DModel

    pipe = DiffusionPipeline.from_pretrained(DIGITS, local_files_only=True)
    assert isinstance(pipe, DDIMPipeline)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.unet.config
    assert cfg.sample_size == 32 and cfg.in_channels == 1 and cfg.out_channels == 1
    assert cfg.num_class_embeds == 11
    sched = pipe.scheduler.config
    assert sched.num_train_timesteps == 1000
    # the scheduler and latentgeo.json agree on what the network predicts
    meta = json.loads((DIGITS / "latentgeo.json").read_text())
    assert sched.prediction_type == meta["prediction_type"] == "v_prediction"
    assert sched.clip_sample is False
    # the sampling grid starts at t = 999, the pure-noise end (scripts/train_bundled_model.py)
    assert sched.timestep_spacing == "trailing" and sched.set_alpha_to_one is True
    # one noise prediction per class label, including the null class 10
    x = torch.randn(11, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = pipe.unet(x, torch.full((11,), 500), class_labels=torch.arange(11)).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_metadata_fields():
    meta = json.loads((DIGITS / "latentgeo.json").read_text())
    assert meta["num_classes"] == 10 and meta["null_class"] == 10
    assert meta["image_size"] == 32 and meta["pixel_range"] == [-1, 1]
    assert meta["steps"] == 50 and meta["guidance"] >= 1.0
    for key in ("seed", "steps", "batch_size", "split", "seconds", "schedule"):
        assert key in meta["training"], key


def test_weights_are_small():
    """Two diffusion models ship now: the DDPM (float32, 6.6 MB) and the flow model (float16,
    3.3 MB; its check figures were measured on the float16 weights), plus the judges (0.9 MB).
    Each model folder stays under 7 MiB and the whole bundle under 12 MiB (10 MiB before the
    flow model)."""
    total = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert total < 12 * 2**20
    for folder in BUNDLED.iterdir():
        if folder.is_dir():
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            assert size < 7 * 2**20, folder.name


@pytest.fixture(scope="module")
def classifier():
    from latentgeo.classifier import load_classifier

    return load_classifier()


def test_classifier_heldout_accuracy(classifier):
    from latentgeo.data import load_mnist_split

    split = load_mnist_split()
    with torch.no_grad():
        logits = classifier(split.heldout_images)
        feats = classifier.features(split.heldout_images[:8])
    assert logits.shape == (500, 10)
    assert feats.ndim == 2 and feats.shape[0] == 8
    acc = float((logits.argmax(1) == split.heldout_labels).float().mean())
    assert acc >= 0.98, acc


def test_classifier_is_eval_and_deterministic(classifier):
    assert not classifier.training
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(classifier(x), classifier(x))


def test_classifier_rejects_wrong_shape(classifier):
    from latentgeo.errors import ShapeError

    with pytest.raises(ShapeError, match=r"\(N, 1, 32, 32\)"):
        classifier(torch.zeros(2, 1, 28, 28))


def test_classifier_missing_folder(tmp_path):
    from latentgeo.classifier import load_classifier
    from latentgeo.errors import ModelError

    with pytest.raises(ModelError, match="cannot load the digit classifier"):
        load_classifier(path=tmp_path)


def test_classifier_is_confident_on_real_digits(classifier):
    """The judge must clear the 0.9 max-probability bar (the unconditional acceptance test)
    on real held-out digits, and be calibrated: a label-smoothed judge capped its confidence
    near 0.955 and rated only 87.8% of real digits >= 0.9."""
    from latentgeo.classifier import expected_calibration_error
    from latentgeo.data import load_mnist_split

    split = load_mnist_split()
    with torch.no_grad():
        prob = classifier(split.heldout_images).softmax(1)
    conf, pred = prob.max(1)
    assert float((conf >= 0.9).float().mean()) >= 0.95
    assert expected_calibration_error(conf, pred == split.heldout_labels) <= 0.03


def test_expected_calibration_error_against_a_loop():
    from latentgeo.classifier import expected_calibration_error
    from latentgeo.errors import ShapeError

    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(1000, generator=gen)
    correct = torch.rand(1000, generator=gen) < conf  # calibrated by construction
    brute = 0.0
    for b in range(15):
        inside = (conf >= b / 15) & ((conf < (b + 1) / 15) if b < 14 else (conf <= 1))
        if inside.any():
            brute += float(inside.float().mean()
                           * (correct[inside].float().mean() - conf[inside].mean()).abs())
    assert expected_calibration_error(conf, correct) == pytest.approx(brute, abs=1e-6)
    assert expected_calibration_error(conf, correct) < 0.05
    # always confident, right half the time: ECE = 1 - 0.5
    ones = torch.ones(10)
    assert expected_calibration_error(ones, torch.arange(10) % 2 == 0) == pytest.approx(0.5)
    with pytest.raises(ShapeError, match="same non-empty shape"):
        expected_calibration_error(ones, torch.ones(3))
