"""Rewards: ``reward(images, condition) -> (B,)``, higher is better, one registry.

A spec is ``KIND:ARGUMENT`` (split at the first ':' only, so the argument may contain ':'):

* ``class:N`` — log p(N | image) under judge A, the bundled digit classifier
  (:func:`latentgeo.classifier.load_judge`); its held-out twin is the same log-probability
  under judge B, which the loop never differentiates (reward hacking shows as target up,
  held-out down). Pixel digit models only (1-channel images).
* ``clip:TEXT`` — CLIP image-text cosine similarity in [-1, 1] with a local transformers
  ``CLIPModel`` folder (``model=PATH``; tokenizer and, when present, ``preprocessor_config.json``
  from the same folder; no downloads).
* ``python:MODULE:FUNCTION`` — a user's callable ``f(images, condition) -> (B,)``; ``MODULE`` is
  imported (the current directory is searched too).

Images are (B, C, H, W) float in [0, 1] with autograd attached; every preprocessing step
(channel mixing, resizing, normalisation) is torch, so gradients reach the seeds.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from latentgeo.errors import InputError, ModelError

RewardFn = Callable[[torch.Tensor, Any], torch.Tensor]

#: OpenAI CLIP's image normalisation (used when the folder has no preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Reward:
    """A named reward: ``fn(images, condition) -> (B,)``; ``heldout`` an independent judge of
    the same goal (never differentiated) or None."""

    spec: str
    fn: RewardFn
    heldout: RewardFn | None = None

    def __call__(self, images: torch.Tensor, condition: Any = None) -> torch.Tensor:
        out = self.fn(images, condition)
        if not isinstance(out, torch.Tensor) or out.shape != (images.shape[0],):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"reward {self.spec}: returned {got}, expected a tensor of shape "
                             f"({images.shape[0]},)")
        return out


def to_judge_input(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> the judges' (B, 1, 32, 32) float32: channels averaged,
    bilinear resize (antialiased when shrinking) when the size differs. Differentiable."""
    x = images.to(torch.float32)
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    if tuple(x.shape[-2:]) != (32, 32):
        shrink = x.shape[-1] > 32 or x.shape[-2] > 32
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False,
                          antialias=shrink)
    return x


def judge_reward(judge: torch.nn.Module, label: int) -> RewardFn:
    """images -> log p(label | image) under ``judge`` (B,)."""
    def reward(images: torch.Tensor, condition: Any = None) -> torch.Tensor:
        x = to_judge_input(images).to(next(judge.parameters()).device)
        return judge.log_prob(x)[:, label].to(images.device)
    return reward


_JUDGES: dict[tuple[str, str], torch.nn.Module] = {}


def _judge(name: str, device: torch.device) -> torch.nn.Module:
    from latentgeo.classifier import load_judge

    key = (name, str(device))
    if key not in _JUDGES:
        judge = load_judge(name, device)
        judge.requires_grad_(False)
        _JUDGES[key] = judge
    return _JUDGES[key]


def class_reward(arg: str, backend: Any = None, model: str | None = None,
                 device: str | torch.device = "cpu") -> Reward:
    """``class:N``: judge A's log-probability of digit N; held-out: judge B's."""
    try:
        label = int(arg)
    except ValueError:
        label = -1
    if not 0 <= label <= 9 or str(label) != arg.strip():
        raise InputError(f"reward class:{arg}: the class must be a digit 0-9")
    if backend is not None and (getattr(backend, "family", "") != "pixel"
                                or getattr(backend, "image_channels", 0) != 1):
        raise InputError(f"reward class:{label} needs a digit model (pixel space, 1 channel); "
                         f"{backend.name} is a {backend.family} model: use clip:TEXT or "
                         "python:MODULE:FUNCTION")
    dev = torch.device(device)
    return Reward(f"class:{label}", judge_reward(_judge("a", dev), label),
                  judge_reward(_judge("b", dev), label))


def judge_reward_per_seed(judge: torch.nn.Module) -> RewardFn:
    """images, labels (list of ints, one per row) -> log p(label_i | image_i) under ``judge``."""
    def reward(images: torch.Tensor, condition: Any = None) -> torch.Tensor:
        labels = [condition] * images.shape[0] if isinstance(condition, int) else condition
        if labels is None or len(labels) != images.shape[0]:
            raise InputError("a per-seed class reward needs one class per seed as its condition")
        x = to_judge_input(images).to(next(judge.parameters()).device)
        idx = torch.tensor([int(c) for c in labels], device=x.device).unsqueeze(1)
        return judge.log_prob(x).gather(1, idx).squeeze(1).to(images.device)
    return reward


def class_reward_per_seed(device: str | torch.device = "cpu") -> Reward:
    """``class:N`` with N given per seed by the reward condition (``optimize(...,
    reward_condition=[c_1, ..., c_B])``): judge A's log-probability, held-out judge B's."""
    dev = torch.device(device)
    return Reward("class:<per seed>", judge_reward_per_seed(_judge("a", dev)),
                  judge_reward_per_seed(_judge("b", dev)))


class ClipScore(torch.nn.Module):
    """Cosine similarity between CLIP image embeddings and one fixed text embedding.

    images (B, C, H, W) in [0, 1] -> (B,): grey images repeated to 3 channels, the shorter
    side resized (bicubic, antialiased) to the model's ``image_size`` and centre-cropped, then
    normalised by the processor's mean/std; all in torch."""

    def __init__(self, model: Any, text_embeds: torch.Tensor, mean: tuple, std: tuple,
                 size: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("text", F.normalize(text_embeds, dim=-1))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.size = size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.dtype)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=s < 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, condition: Any = None) -> torch.Tensor:
        x = self.preprocess(images).to(self.text.device)
        emb = self.model.get_image_features(pixel_values=x.to(self.model.dtype))
        emb = getattr(emb, "pooler_output", emb)  # transformers >= 5 may return an output
        return (F.normalize(emb.to(self.text.dtype), dim=-1) @ self.text).to(images.device)


def clip_reward(arg: str, backend: Any = None, model: str | None = None,
                device: str | torch.device = "cpu") -> Reward:
    """``clip:TEXT`` with the CLIPModel folder ``model`` (required)."""
    if not arg.strip():
        raise InputError("reward clip:TEXT: the text is empty")
    if model is None:
        raise InputError(f"reward clip:{arg} needs a local CLIP model folder (model=PATH: "
                         "any transformers CLIPModel folder)")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelError(f"CLIP model {model}: not a folder")
    try:
        from transformers import AutoTokenizer, CLIPModel

        clip = CLIPModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a CLIP model from {path}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    clip = clip.to(device).eval()
    clip.requires_grad_(False)
    mean, std = CLIP_MEAN, CLIP_STD
    size = int(clip.config.vision_config.image_size)
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    tokens = tokenizer([arg], padding="max_length", truncation=True,
                       max_length=min(int(clip.config.text_config.max_position_embeddings),
                                      int(getattr(tokenizer, "model_max_length", 77) or 77)),
                       return_tensors="pt").to(device)
    with torch.no_grad():
        text = clip.get_text_features(**tokens)
        text = getattr(text, "pooler_output", text)
    score = ClipScore(clip, text[0].float(), mean, std, size).to(device)
    return Reward(f"clip:{arg}", score)


def python_reward(arg: str, backend: Any = None, model: str | None = None,
                  device: str | torch.device = "cpu") -> Reward:
    """``python:MODULE:FUNCTION``: import MODULE (also from the current directory)."""
    module_name, _, func = arg.rpartition(":")
    if not module_name or not func:
        raise InputError(f"reward python:{arg}: expected python:MODULE:FUNCTION")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            if os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as exc:  # a user's module may raise anything on import
        raise InputError(f"reward python:{arg}: cannot import {module_name}: "
                         f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise InputError(f"reward python:{arg}: {module_name} has no callable {func!r}")
    return Reward(f"python:{arg}", fn)


#: kind -> factory(argument, backend, model, device) -> Reward.
REWARDS: dict[str, Callable[..., Reward]] = {
    "class": class_reward,
    "clip": clip_reward,
    "python": python_reward,
}


def parse_reward(spec: str, backend: Any = None, model: str | None = None,
                 device: str | torch.device = "cpu") -> Reward:
    """A reward from its spec ``KIND:ARGUMENT`` (module docstring); unknown kinds raise
    ``InputError`` listing the registry; ``backend`` lets a reward refuse a model it cannot
    judge."""
    kind, sep, arg = str(spec).partition(":")
    if kind not in REWARDS or not sep:
        raise InputError(f"unknown reward {spec!r} (choose from class:N, clip:TEXT, "
                         "python:MODULE:FUNCTION)")
    return REWARDS[kind](arg, backend, model, device)
