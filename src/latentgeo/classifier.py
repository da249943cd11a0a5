"""The digit judges: classifiers that score every evaluation of the bundled model.

Two judges, both on (N, 1, 32, 32) images in [0, 1] (the layout of ``latentgeo.data``), both
trained by ``scripts/train_classifier.py`` with plain cross-entropy (see the model card,
``docs/models/judges.md``):

* **judge A** (``DigitClassifier``, ``latentgeo/bundled/classifier/``): a 6-conv BatchNorm CNN
  with max-pooling and a global average pool, seed 0, all 4,500 training digits. It judges
  every figure of the first release and is the *target* reward ``class:N`` of ``optimize``.
* **judge B** (``WideDigitClassifier``, ``latentgeo/bundled/judge_b/``): a wide, shallow
  2-conv CNN with 5x5 kernels, GroupNorm, GELU, average pooling and a flattened 4x4 map, seed 1,
  trained on the even-indexed half of the 4,500 training digits only. It is the *held-out*
  reward: the optimisation loop never sees it, so target up and judge B down is reward hacking.

Every judge has the same interface: ``features(x)`` the penultimate activations (used for the
feature Fréchet distance, the FID recipe of Heusel et al. 2017 with a judge in place of
Inception), ``forward(x)`` the logits (N, 10), ``log_prob(x)`` the log-probabilities (N, 10).
None of them disables gradients: an optimiser differentiates rewards through a judge to its
input, and callers wrap ``torch.no_grad()`` where they mean it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from latentgeo.errors import ModelError, ShapeError

#: Folder of the shipped judge A (the first release's classifier).
CLASSIFIER_DIR = Path(__file__).resolve().parent / "bundled" / "classifier"
#: Folder of the shipped judge B (the held-out judge).
JUDGE_B_DIR = Path(__file__).resolve().parent / "bundled" / "judge_b"
#: Shipped judges by name.
JUDGES = {"a": CLASSIFIER_DIR, "b": JUDGE_B_DIR}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class DigitJudge(nn.Module):
    """Base of the judges, the shared interface: ``body`` + ``embed`` give the features,
    ``dropout`` + ``head`` the logits. Subclasses build the four modules and ``config`` (which
    ``from_config`` reads back)."""

    config: dict

    @classmethod
    def from_config(cls, config: dict) -> DigitJudge:
        """A fresh, untrained judge of this architecture from its config.json dict."""
        raise NotImplementedError

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

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, 10), ``log_softmax`` of the logits, of images (N, 1, 32, 32)
        in [0, 1]; differentiable with respect to ``x``."""
        return torch.log_softmax(self(x), dim=1)


class DigitClassifier(DigitJudge):
    """Judge A. CNN: 3 stages of two 3x3 conv + BN + ReLU (widths ``channels``), 2x2 max-pool
    after the first two, global average pool, a ``feature_dim`` ReLU layer, a linear head to 10
    logits. Input float32 (N, 1, 32, 32) in [0, 1]."""

    arch = "cnn"

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 128,
                 dropout: float = 0.2) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.config = {"arch": self.arch, "channels": [c1, c2, c3],
                       "feature_dim": feature_dim, "dropout": dropout}
        self.body = nn.Sequential(
            _block(1, c1), nn.MaxPool2d(2),
            _block(c1, c2), nn.MaxPool2d(2),
            _block(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(c3, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    @classmethod
    def from_config(cls, config: dict) -> DigitClassifier:
        return cls(tuple(config["channels"]), config["feature_dim"], config.get("dropout", 0.0))


class WideDigitClassifier(DigitJudge):
    """Judge B. Wide, shallow CNN: two stages of one 5x5 conv + GroupNorm (``groups``) + GELU
    (widths ``channels``), a 2x2 average pool after the first (32 -> 16) and a 4x4 one after
    the second (16 -> 4); the 4x4 map is flattened (no global pooling: the embedding sees where
    the strokes are), then a ``feature_dim`` GELU layer and a linear head to 10 logits.
    Input float32 (N, 1, 32, 32) in [0, 1].

    Differs from judge A in depth (2 convs, not 6), kernel (5x5), normalisation (GroupNorm: no
    batch statistics, train and eval normalise alike), activation (GELU), pooling (average, not
    max; flattened map, not global average)."""

    arch = "wide"

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 96,
                 groups: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        c1, c2 = channels
        self.config = {"arch": self.arch, "channels": [c1, c2], "feature_dim": feature_dim,
                       "groups": groups, "dropout": dropout}
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2, bias=False), nn.GroupNorm(groups, c1), nn.GELU(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2, bias=False), nn.GroupNorm(groups, c2), nn.GELU(),
            nn.AvgPool2d(4), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(c2 * 16, feature_dim), nn.GELU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    @classmethod
    def from_config(cls, config: dict) -> WideDigitClassifier:
        return cls(tuple(config["channels"]), config["feature_dim"], config["groups"],
                   config.get("dropout", 0.0))


#: Judge architectures by the ``arch`` key of their config.json (judge A's predates the key).
ARCHITECTURES: dict[str, type[DigitJudge]] = {"cnn": DigitClassifier, "wide": WideDigitClassifier}


def build_classifier(config: dict) -> DigitJudge:
    """A fresh judge from a config dict (``arch`` defaults to ``"cnn"``, judge A's)."""
    arch = config.get("arch", "cnn")
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown classifier architecture {arch!r}; "
                         f"known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch].from_config(config)


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
                    path: str | Path | None = None) -> DigitJudge:
    """Load judge A (or the judge saved at ``path``, of the architecture its config.json
    names) in eval mode on ``device``. Gradients stay on: callers choose ``no_grad``."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else CLASSIFIER_DIR
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
        model = build_classifier(config)
        model.load_state_dict(state)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load the digit classifier from {folder}: {exc}") from exc
    return model.to(device).eval()


def load_judge(name: str = "a", device: str | torch.device = "cpu") -> DigitJudge:
    """Load a shipped judge by name (``"a"``: the first release's classifier, the target
    reward; ``"b"``: the held-out judge) in eval mode on ``device``."""
    if name not in JUDGES:
        raise ModelError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    return load_classifier(device, JUDGES[name])


def save_classifier(model: DigitJudge, folder: str | Path, extra: dict | None = None,
                    ) -> None:
    """Write ``config.json`` (architecture + ``extra``) and ``model.safetensors`` to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = dict(model.config, **(extra or {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
