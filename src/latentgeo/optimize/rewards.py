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
* ``match:DIR`` — SeedSelect (Samuel et al. 2023): minus the loss 10 x semantic + appearance
  towards the reference images in DIR (:func:`match_reward`, which also takes a tensor of
  references). It reads the clean estimates of the last 3 sampler states (``Reward.estimates``).

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
    the same goal (never differentiated) or None.

    ``estimates`` = k > 0 declares that the reward also reads the decoded clean estimates of
    the last k sampler states and the final clean latent: the loop then renders with
    ``render_grad(..., estimates=k)`` and calls ``fn(images, condition, estimates=[k images,
    oldest first, the last being ``images``], latent=x0)`` (the held-out twin likewise); a
    grid of S < k - 1 steps has only S + 1 states, and the reward gets those.
    Called without them (``reward(images)``), such a reward gets None for both and must
    cope (``match`` then scores every term on the final image and re-encodes it)."""

    spec: str
    fn: RewardFn
    heldout: RewardFn | None = None
    estimates: int = 0

    def __call__(self, images: torch.Tensor, condition: Any = None,
                 estimates: list[torch.Tensor] | None = None,
                 latent: torch.Tensor | None = None) -> torch.Tensor:
        if self.estimates:
            if estimates is not None:
                estimates = list(estimates)[-self.estimates:]
            out = self.fn(images, condition, estimates=estimates, latent=latent)
        else:
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


def load_clip(model: str | os.PathLike | None, device: str | torch.device = "cpu",
              what: str = "CLIP model") -> tuple[Any, Any, tuple, tuple, int]:
    """A local transformers ``CLIPModel`` folder -> (model (eval, frozen), tokenizer or None,
    image mean, image std, image size); mean/std from ``preprocessor_config.json`` when the
    folder has one, else OpenAI CLIP's. No downloads."""
    if model is None:
        raise InputError(f"{what}: no folder given")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelError(f"{what} {model}: not a folder")
    try:
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a CLIP model from {path}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError):
        tokenizer = None  # an image-only use (match:DIR features) needs none
    clip = clip.to(device).eval()
    clip.requires_grad_(False)
    mean, std = CLIP_MEAN, CLIP_STD
    size = int(clip.config.vision_config.image_size)
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    return clip, tokenizer, mean, std, size


def clip_reward(arg: str, backend: Any = None, model: str | None = None,
                device: str | torch.device = "cpu") -> Reward:
    """``clip:TEXT`` with the CLIPModel folder ``model`` (required)."""
    if not arg.strip():
        raise InputError("reward clip:TEXT: the text is empty")
    if model is None:
        raise InputError(f"reward clip:{arg} needs a local CLIP model folder (model=PATH: any "
                         "transformers CLIPModel folder)")
    clip, tokenizer, mean, std, size = load_clip(model, device)
    if tokenizer is None:
        raise ModelError(f"cannot load a tokenizer from {Path(model).expanduser()}")
    tokens = tokenizer([arg], padding="max_length", truncation=True,
                       max_length=min(int(clip.config.text_config.max_position_embeddings),
                                      int(getattr(tokenizer, "model_max_length", 77) or 77)),
                       return_tensors="pt").to(device)
    with torch.no_grad():
        text = clip.get_text_features(**tokens)
        text = getattr(text, "pooler_output", text)
    score = ClipScore(clip, text[0].float(), mean, std, size).to(device)
    return Reward(f"clip:{arg}", score)


# -- match:DIR (SeedSelect) -----------------------------------------------------------------------
#: SeedSelect's weights of the semantic term at the last 3 sampler states, oldest first.
SEEDSELECT_WEIGHTS: tuple[float, ...] = (0.05, 0.25, 0.7)
#: SeedSelect's weight of the semantic term against the appearance term.
SEEDSELECT_SEMANTIC: float = 10.0


class ClipFeatures(torch.nn.Module):
    """images (B, C, H, W) in [0, 1] -> CLIP image embeddings (B, F) float32, with
    :class:`ClipScore`'s torch preprocessing (differentiable)."""

    def __init__(self, model: Any, mean: tuple, std: tuple, size: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.size = size

    preprocess = ClipScore.preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).to(self.mean.device)
        emb = self.model.get_image_features(pixel_values=x.to(self.model.dtype))
        emb = getattr(emb, "pooler_output", emb)
        return emb.to(torch.float32)


class JudgeFeatures(torch.nn.Module):
    """images (B, C, H, W) in [0, 1] -> a digit judge's penultimate activations (B, F)
    (:meth:`latentgeo.classifier.DigitJudge.features` after :func:`to_judge_input`)."""

    def __init__(self, judge: torch.nn.Module) -> None:
        super().__init__()
        self.judge = judge

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_judge_input(images).to(next(self.judge.parameters()).device)
        return self.judge.features(x).to(torch.float32)


def seedselect_terms(features: Callable[[torch.Tensor], torch.Tensor],
                     estimates: list[torch.Tensor], latent: torch.Tensor,
                     target_feature: torch.Tensor, target_latent: torch.Tensor,
                     weights: tuple[float, ...] = SEEDSELECT_WEIGHTS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """SeedSelect's two loss terms per row (float64 (B,) each):

    semantic_i   = sum_k weights[k] (1 - cos(features(estimates[k])_i, target_feature)),
    appearance_i = mean over the latent's entries of (latent_i - target_latent)^2.

    ``estimates``: len(weights) decoded images (B, C, H, W), oldest first (fewer: the weights'
    last entries are used); ``target_feature`` (F,) (normalised here); ``target_latent``
    (*latent_shape). Rows are independent."""
    w = list(weights)[-len(estimates):]
    t = F.normalize(target_feature.to(torch.float64).reshape(-1), dim=0)
    semantic = 0.0
    for wk, img in zip(w, estimates):
        f = F.normalize(features(img).to(torch.float64).flatten(1), dim=1)
        semantic = semantic + wk * (1.0 - f @ t.to(f.device))
    diff = latent.to(torch.float64) - target_latent.to(latent.device, torch.float64)
    appearance = diff.flatten(1).pow(2).mean(1)
    return semantic.to(appearance.device), appearance


def _chunks(x: torch.Tensor, size: int = 16) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


def match_reward(backend: Any, references: torch.Tensor, feature_model: Any = None, *,
                 weights: tuple[float, ...] = SEEDSELECT_WEIGHTS,
                 semantic_weight: float = SEEDSELECT_SEMANTIC, spec: str | None = None,
                 device: str | torch.device | None = None) -> Reward:
    """SeedSelect's objective as a reward: minus ``semantic_weight`` x semantic + appearance
    (:func:`seedselect_terms`), towards ``references``.

    references: (N, image_channels, H, W) in [0, 1] at the backend's image size (what
        :func:`latentgeo.images.load_image`, ``load_mnist_split`` and ``render`` give).
    feature_model: None -> judge A's penultimate layer (pixel digit models only; the held-out
        twin is the same loss with judge B's features); a path -> a local transformers
        ``CLIPModel`` folder (image embeddings; no held-out twin); or any module/callable
        images -> (B, F) features (no held-out twin).
    Targets: the normalised mean feature of the references, and the mean of
    ``backend.encode(references)`` (the VAE latent for latent models, the model's own pixel
    space 2 x - 1 for pixel models), computed once here.

    Where the semantic term looks: the *clean estimate* (x0-hat, decoded) of each of the last
    3 sampler states, not the decoded noisy state that SeedSelect's code decodes. The decoder
    and the feature model only ever saw clean data; a decoded noisy state mixes the content
    with noise the features then measure (for a pixel model it *is* a noisy image), while the
    clean estimate is the model's own prediction of where that state ends up, costs no extra
    network call, and for the last state is the rendered image itself. The appearance term
    compares the final clean latent (what ``render_grad`` returns as x0).
    """
    if not isinstance(references, torch.Tensor) or references.ndim != 4:
        raise InputError("match: references must be images (N, C, H, W)")
    if references.shape[0] < 1:
        raise InputError("match: no reference images")
    if not bool(torch.isfinite(references).all()):
        raise InputError("match: reference images have NaN or infinite values")
    if len(weights) < 1 or not all(w >= 0 for w in weights):
        raise InputError(f"match: semantic weights {weights}: need at least one, all >= 0")
    dev = torch.device(device) if device is not None else torch.device(backend.device)
    heldout_features = None
    if feature_model is None:
        if getattr(backend, "family", "") != "pixel" or getattr(backend, "image_channels",
                                                                  0) != 1:
            raise InputError(f"reward match needs a feature model for {backend.name} (a "
                             f"{backend.family} model): give feature_model (a local "
                             "transformers CLIPModel folder)")
        features: Any = JudgeFeatures(_judge("a", dev))
        heldout_features = JudgeFeatures(_judge("b", dev))
    elif isinstance(feature_model, (str, os.PathLike)):
        clip, _, mean, std, size = load_clip(feature_model, dev, what="feature model")
        features = ClipFeatures(clip, mean, std, size).to(dev)
    elif callable(feature_model):
        features = feature_model
    else:
        raise InputError("match: feature_model must be None, a CLIPModel folder or a callable "
                         "images -> (B, F)")
    refs = references.to(torch.float32)
    with torch.no_grad():
        feat = torch.cat([features(r.to(dev)).to(torch.float64) for r in _chunks(refs)])
        target_feature = F.normalize(feat.flatten(1).mean(0), dim=0)
        lat = torch.cat([backend.encode(r.to(backend.device)).to(torch.float64)
                         for r in _chunks(refs)])
        target_latent = lat.mean(0)
        held_feature = None
        if heldout_features is not None:
            hf = torch.cat([heldout_features(r.to(dev)).to(torch.float64)
                            for r in _chunks(refs)])
            held_feature = F.normalize(hf.flatten(1).mean(0), dim=0)
    k = len(weights)

    def make(feats: Any, target: torch.Tensor) -> RewardFn:
        def reward(images: torch.Tensor, condition: Any = None,
                   estimates: list[torch.Tensor] | None = None,
                   latent: torch.Tensor | None = None) -> torch.Tensor:
            est = list(estimates) if estimates is not None else [images] * k
            z = latent if latent is not None else backend.encode(images.clamp(0, 1))
            sem, app = seedselect_terms(feats, est, z, target, target_latent, weights)
            return -(semantic_weight * sem + app).to(images.device)
        return reward

    heldout = make(heldout_features, held_feature) if heldout_features is not None else None
    name = spec if spec is not None else f"match:<{references.shape[0]} images>"
    return Reward(name, make(features, target_feature), heldout, estimates=k)


def match_reward_spec(arg: str, backend: Any = None, model: str | None = None,
                      device: str | torch.device = "cpu") -> Reward:
    """``match:DIR``: the image files of DIR (unreadable ones skipped with a warning) as
    references of :func:`match_reward`; ``model``: the feature model folder (None: judge A)."""
    import warnings

    from latentgeo.images import load_image_folder

    if not arg.strip():
        raise InputError("reward match:DIR: the folder is empty")
    if backend is None:
        raise InputError(f"reward match:{arg} needs the model (its image size and encoder)")
    images, _, problems = load_image_folder(arg, backend.image_size, backend.image_channels)
    for msg in problems:
        warnings.warn(f"skipped: {msg}", stacklevel=2)
    return match_reward(backend, images, model, spec=f"match:{arg}", device=device)


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
    "match": match_reward_spec,
}


def parse_reward(spec: str, backend: Any = None, model: str | None = None,
                 device: str | torch.device = "cpu") -> Reward:
    """A reward from its spec ``KIND:ARGUMENT`` (module docstring); unknown kinds raise
    ``InputError`` listing the registry; ``backend`` lets a reward refuse a model it cannot
    judge."""
    kind, sep, arg = str(spec).partition(":")
    if kind not in REWARDS or not sep:
        raise InputError(f"unknown reward {spec!r} (choose from class:N, clip:TEXT, "
                         "python:MODULE:FUNCTION, match:DIR)")
    return REWARDS[kind](arg, backend, model, device)
