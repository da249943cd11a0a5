"""The digit classifier that judges every evaluation of the bundled model.

A small CNN on (N, 1, 32, 32) images in [0, 1] (the layout of ``latentgeo.data``), trained by
``scripts/train_classifier.py`` on the same 4,500-image training split as the bundled DDPM and
shipped as ``latentgeo/bundled/classifier/{config.json, model.safetensors}``.

``features(x)`` gives the penultimate activations used for the feature Fréchet distance
(the FID recipe of Heusel et al. 2017 with this classifier in place of Inception).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from latentgeo.errors import ModelError, ShapeError

#: Folder of the shipped classifier.
CLASSIFIER_DIR = Path(__file__).resolve().parent / "bundled" / "classifier"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class DigitClassifier(nn.Module):
    """CNN: 3 stages of two 3x3 conv + BN + ReLU (widths ``channels``), 2x2 max-pool after
    the first two, global average pool, a ``feature_dim`` ReLU layer, a linear head to 10
    logits. Input float32 (N, 1, 32, 32) in [0, 1]."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 128,
                 dropout: float = 0.2) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.config = {"channels": [c1, c2, c3], "feature_dim": feature_dim,
                       "dropout": dropout}
        self.body = nn.Sequential(
            _block(1, c1), nn.MaxPool2d(2),
            _block(c1, c2), nn.MaxPool2d(2),
            _block(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(c3, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 32, 32):
            raise ShapeError(f"classifier expects images (N, 1, 32, 32), got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images (N, 1, 32, 32) in [0, 1]."""
        self._check(x)
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) of images (N, 1, 32, 32) in [0, 1]."""
        return self.head(self.dropout(self.features(x)))


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor,
                               bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017, "On calibration of modern neural
    networks") over ``bins`` equal-width confidence bins: sum_b |B_b| / N * |acc(B_b) -
    conf(B_b)|.

    confidence: (N,) predicted max-probabilities in [0, 1]; correct: (N,) 0/1 (or bool).
    """
    conf = confidence.detach().double().flatten()
    hit = correct.detach().double().flatten()
    if conf.shape != hit.shape or conf.numel() == 0:
        raise ShapeError(f"confidence {tuple(confidence.shape)} and correct "
                         f"{tuple(correct.shape)} must be the same non-empty shape")
    which = (conf * bins).long().clamp(0, bins - 1)
    # |B_b| (acc_b - conf_b) is the per-bin sum of (hit - conf)
    gap = torch.bincount(which, hit - conf, minlength=bins).abs()
    return float(gap.sum() / conf.numel())


def load_classifier(device: str | torch.device = "cpu",
                    path: str | Path | None = None) -> DigitClassifier:
    """Load the shipped classifier (or one saved at ``path``) in eval mode on ``device``."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else CLASSIFIER_DIR
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the digit classifier from {folder}: {exc}") from exc
    model = DigitClassifier(tuple(config["channels"]), config["feature_dim"],
                            config.get("dropout", 0.0))
    model.load_state_dict(state)
    return model.to(device).eval()


def save_classifier(model: DigitClassifier, folder: str | Path, extra: dict | None = None,
                    ) -> None:
    """Write ``config.json`` (architecture + ``extra``) and ``model.safetensors`` to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = dict(model.config, **(extra or {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
