"""Tiny diffusers pipelines built from scratch in a temp dir (no network), for tests.

* :func:`build_tiny_sd` — a Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel from a tiny CLIPTextConfig, CLIPTokenizer from vocab.json/merges.txt written
  here, DDIMScheduler), saved with ``save_pretrained``. Seeds (4, 8, 8) -> images (3, 16, 16).
* :func:`build_tiny_pixel` — a folder in the bundled model's format (``DDIMPipeline`` with a
  class-conditional UNet2DModel, num_class_embeds = 11, null class 10, plus latentgeo.json).
  Seeds (1, 16, 16).

Weights are random but fixed by ``torch.manual_seed(0)``. The inversion tests reuse these.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SD_LATENT = (4, 8, 8)
TINY_SD_IMAGE = (3, 16, 16)
TINY_PIXEL_LATENT = (1, 16, 16)
_MAX_LEN = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (so every byte is a vocabulary symbol)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json (every byte symbol, alone and word-final, plus a few merges and the two
    special tokens) and merges.txt into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = [("a", "b"), ("c", "d"), ("t", "h"), ("th", "e</w>"), ("d", "o"), ("do", "g</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def build_tiny_sd(path: str | Path) -> Path:
    """Build and save a tiny StableDiffusionPipeline at ``path``; returns ``path``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    vocab_path, merges_path = write_tiny_clip_vocab(path.parent / f"{path.name}-tokenizer-src")
    tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path),
                              model_max_length=_MAX_LEN)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD_LATENT[1], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, sample_size=TINY_SD_IMAGE[1],
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=_MAX_LEN, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_tiny_pixel(path: str | Path, guidance: float = 2.0, steps: int = 10) -> Path:
    """Build and save a tiny folder in the bundled model's format at ``path``."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    path = Path(path)
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=TINY_PIXEL_LATENT[1], in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=11,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    # Random weights make near-zero outputs; scale the class embedding so classes matter.
    with torch.no_grad():
        unet.class_embedding.weight.mul_(10.0)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    (path / "latentgeo.json").write_text(json.dumps({
        "num_classes": 10, "null_class": 10, "guidance": guidance, "steps": steps,
        "image_size": TINY_PIXEL_LATENT[1], "pixel_range": [-1, 1]}))
    return path


_CACHE: dict[str, Path] = {}


def _cached(kind: str, build) -> Path:
    """Build each tiny model once per test process, in a temp dir removed at exit."""
    if kind not in _CACHE:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix=f"latentgeo-tiny-{kind}-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE[kind] = build(root / kind)
    return _CACHE[kind]


def tiny_sd_path() -> Path:
    """Path of a tiny SD pipeline folder, built once per test session."""
    return _cached("sd", build_tiny_sd)


def tiny_pixel_path() -> Path:
    """Path of a tiny bundled-format folder, built once per test session."""
    return _cached("pixel", build_tiny_pixel)
