"""CLI: `latentgeo optimize` on the tiny pixel model and, end to end, on the tiny SD pipeline
with a tiny CLIP reward built here (no hub)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from latentgeo.io import load_latent, save_latent
from tests.conftest import assert_one_line_error
from tests.tiny_sd import (
    TINY_PIXEL_LATENT,
    TINY_SD_LATENT,
    tiny_pixel_path,
    tiny_sd_path,
    write_tiny_clip_vocab,
)


def _seed(path, shape, seed=0):
    save_latent(path, torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny transformers CLIPModel folder (random weights, local byte-level vocabulary)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab, merges = write_tiny_clip_vocab(folder / "tok-src")
    tok = CLIPTokenizer(vocab_file=str(vocab), merges_file=str(merges), model_max_length=16)
    n_vocab = len(json.loads(vocab.read_text()))
    config = CLIPConfig(
        text_config={"vocab_size": n_vocab, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "projection_dim": 8,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 4,
                       "projection_dim": 8},
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    return folder / "clip"


def test_optimize_writes_named_seeds_metadata_and_renders(cli, tmp_path):
    model = str(tiny_pixel_path())
    _seed(tmp_path / "in" / "a.pt", TINY_PIXEL_LATENT, 1)
    _seed(tmp_path / "in" / "b.pt", (2, *TINY_PIXEL_LATENT), 2)
    r = cli("optimize", tmp_path / "in", "-o", f"{tmp_path / 'out'}/", "--reward", "class:3",
            "--model", model, "--steps", "2", "--iters", "3", "--reg", "mpgr", "--rescale",
            "--reg-weight", "0.5", "--render", tmp_path / "img", "--json")
    out = json.loads(r.stdout)
    assert [s["seed"] for s in out["seeds"]] == ["a", "b_000", "b_001"]
    assert out["settings"]["reg"] == "mpgr" and out["settings"]["rescale"] is True
    for s in out["seeds"]:
        z, meta = load_latent(tmp_path / "out" / f"{s['seed']}.safetensors")
        assert z.shape == TINY_PIXEL_LATENT and torch.isfinite(z).all()
        assert meta["rewards"] == "class:3" and meta["preset"] == "reno"
        assert meta["regularizer"] == "mpgr" and meta["iterations"] == "3"
        objectives = [e["objective"] for e in out["log"][s["seed"]]]
        assert s["best_iteration"] == objectives.index(max(objectives))  # best by objective
        assert math.isfinite(float(meta["heldout_after"]))
        for w in ("before", "after", "trajectory"):
            assert (tmp_path / "img" / f"{s['seed']}_{w}.png").is_file()
        assert len(out["log"][s["seed"]]) == 4
    # No --force: nothing is replaced.
    r = cli("optimize", tmp_path / "in" / "a.pt", "-o", f"{tmp_path / 'out'}/", "--reward",
            "class:3", "--model", model, "--steps", "2", "--iters", "1", expect=2)
    assert_one_line_error(r, "exists")


def test_optimize_bad_input_is_one_line(cli, tmp_path):
    model = str(tiny_pixel_path())
    a = _seed(tmp_path / "a.pt", TINY_PIXEL_LATENT)
    base = ["optimize", a, "-o", tmp_path / "o.pt", "--model", model, "--steps", "1"]
    assert_one_line_error(cli(*base, "--reward", "aesthetic", expect=2), "class:N, clip:TEXT")
    assert_one_line_error(cli(*base, "--reward", "class:3", "--reward-weight", "1",
                              "--reward-weight", "2", expect=2), "one per --reward")
    assert_one_line_error(cli(*base, "--reward", "class:12", expect=2), "digit 0-9")
    assert_one_line_error(cli(*base, "--reward", "clip:a dog", expect=2), "--reward-model")
    r = cli(*base, "--reward", "class:3", "--reg", "nope", expect=2)
    assert "none" in r.stderr and "mpgr" in r.stderr and "Traceback" not in r.stderr
    r = cli(*base, "--reward", "class:3", "--preset", "adam", expect=2)
    assert "reno" in r.stderr
    assert not (tmp_path / "o.pt").exists()
    sd = str(tiny_sd_path())
    s = _seed(tmp_path / "s.pt", TINY_SD_LATENT)
    assert_one_line_error(cli("optimize", s, "-o", tmp_path / "o.pt", "--model", sd,
                              "--reward", "class:3", "--prompt", "a dog", expect=2),
                          "needs a digit model")


def test_python_reward_nan_and_interrupt(cli, tmp_path, monkeypatch):
    """A user's reward from the current directory; NaN stops the seed and keeps its best
    finite iterate (said on stderr); Ctrl-C leaves no file."""
    (tmp_path / "lg_cli_reward.py").write_text(textwrap.dedent("""
        import torch
        calls = {"n": 0}

        def good(images, condition):
            return images.flatten(1).mean(1)

        def nan_late(images, condition):
            calls["n"] += 1
            out = images.flatten(1).mean(1)
            return out * float("nan") if calls["n"] >= 3 else out

        def interrupt(images, condition):
            raise KeyboardInterrupt
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = str(tiny_pixel_path())
    a = _seed(tmp_path / "a.pt", TINY_PIXEL_LATENT)
    base = ["optimize", a, "--model", model, "--steps", "1", "--iters", "4"]
    r = cli(*base, "-o", tmp_path / "g.pt", "--reward", "python:lg_cli_reward:good")
    assert (tmp_path / "g.pt").is_file()
    r = cli(*base, "-o", tmp_path / "n.pt", "--reward", "python:lg_cli_reward:nan_late")
    assert "non-finite objective at iteration 2" in r.stderr
    z, meta = load_latent(tmp_path / "n.pt")
    assert torch.isfinite(z).all() and int(meta["best_iteration"]) <= 1
    r = cli(*base, "-o", tmp_path / "i.pt", "--reward", "python:lg_cli_reward:interrupt",
            expect=130)
    assert "interrupted" in r.stderr and not (tmp_path / "i.pt").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*tmp*"))


def test_end_to_end_tiny_sd_with_tiny_clip_reward(cli, tmp_path, tiny_clip):
    """Tiny SD pipeline, clip:TEXT reward from a local CLIPModel folder, gradients through the
    VAE decoder and CLIP's torch preprocessing: the best iterate's reward is not below the
    start's, and the written seed renders to that reward."""
    sd = str(tiny_sd_path())
    s = _seed(tmp_path / "s.pt", TINY_SD_LATENT, 3)
    r = cli("optimize", s, "-o", tmp_path / "o.pt", "--model", sd, "--prompt", "the dog",
            "--reward", "clip:the dog", "--reward-model", tiny_clip, "--steps", "2",
            "--iters", "3", "--reg", "none", "--lr", "50", "--render", tmp_path / "img",
            "--json")
    out = json.loads(r.stdout)["seeds"][0]
    assert out["reward_after"] >= out["reward_before"]
    assert -1 <= out["reward_before"] <= 1
    assert out["heldout_before"] is None  # clip has no held-out twin (strict JSON: null)
    z, meta = load_latent(tmp_path / "o.pt")
    assert z.shape == TINY_SD_LATENT and meta["rewards"] == "clip:the dog"
    assert (tmp_path / "img" / "s_trajectory.png").is_file()

    from latentgeo.diffusion import load_model, render
    from latentgeo.optimize import parse_reward

    backend = load_model(sd)
    reward = parse_reward("clip:the dog", backend, str(tiny_clip))
    with torch.no_grad():
        value = float(reward(render(backend, z[None], "the dog", steps=2), "the dog")[0])
    assert abs(value - out["reward_after"]) < 1e-4
