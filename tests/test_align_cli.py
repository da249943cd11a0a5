"""``latentgeo align`` and ``--soft-tokens`` on render / invert (tiny bundled-format model)."""

from __future__ import annotations

import json

import pytest
import torch

from latentgeo.align import load_tokens
from latentgeo.images import save_image
from latentgeo.io import save_latent
from tests.conftest import assert_one_line_error
from tests.tiny_sd import TINY_PIXEL_LATENT, tiny_pixel_path


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """Six 16x16 greyscale images with class labels in metadata.jsonl."""
    folder = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(6):
        save_image(folder / f"{i}.png", torch.rand(1, 16, 16, generator=g))
        lines.append(json.dumps({"file_name": f"{i}.png", "label": i % 3}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def token_file(digits_folder, tmp_path_factory):
    from typer.testing import CliRunner

    from latentgeo.cli import app

    out = tmp_path_factory.mktemp("tok") / "t.safetensors"
    r = CliRunner().invoke(app, ["align", str(digits_folder), "--model", str(tiny_pixel_path()),
                                 "-o", str(out), "--max-iters", "2", "--batch-size", "3",
                                 "--lr", "0.05", "--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and summary["loss"] == "softrepa"
    return out


def test_align_writes_tokens_with_metadata(token_file):
    tokens = load_tokens(token_file)
    assert tokens.meta["loss"] == "softrepa" and tokens.meta["steps"] == "2"
    assert tokens.meta["family"] == "pixel" and len(tokens.meta["fingerprint"]) == 16
    assert tokens.points == ("class_embedding",)
    assert tokens.values[:, :3].abs().sum() > 0


def test_align_agsm_stores_both_banks(cli, digits_folder, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "a.safetensors"
    cli("align", digits_folder, "--model", tiny_pixel_path(), "-o", out, "--loss", "agsm",
        "--max-iters", "1", "--batch-size", "3", "--json")
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"tokens", "negative"}
        assert f.metadata()["bank"] == "positive" and f.metadata()["loss"] == "agsm"


def test_render_with_tokens_changes_the_image(cli, token_file, tmp_path):
    save_latent(tmp_path / "z.pt", torch.randn(TINY_PIXEL_LATENT,
                                               generator=torch.Generator().manual_seed(1)))
    common = ["--model", tiny_pixel_path(), "--class", "1", "--steps", "3", "--guidance", "1"]
    cli("render", tmp_path / "z.pt", "-o", tmp_path / "plain", *common, "--json")
    cli("render", tmp_path / "z.pt", "-o", tmp_path / "tok", *common, "--soft-tokens",
        token_file, "--json")
    a = (tmp_path / "plain" / "z.png").read_bytes()
    b = (tmp_path / "tok" / "z.png").read_bytes()
    assert a != b
    # tokens are part of an output's provenance: resuming into the token render's folder
    # without them (or into the plain one with them) is refused, not silently mixed
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "tok", *common, expect=None)
    assert_one_line_error(r, "different run")
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "plain", *common, "--soft-tokens",
            token_file, expect=None)
    assert_one_line_error(r, "different run")
    cli("render", tmp_path / "z.pt", "-o", tmp_path / "tok", *common, "--soft-tokens",
        token_file)  # same run again: resumed, nothing redone
    assert (tmp_path / "tok" / "z.png").read_bytes() == b


def test_tokens_refused_by_another_model(cli, token_file, tmp_path):
    save_latent(tmp_path / "z.pt", torch.randn(1, 32, 32))
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "o", "--model", "bundled",
            "--soft-tokens", token_file, expect=None)
    assert_one_line_error(r, "--soft-tokens", "trained for")
    save_image(tmp_path / "img.png", torch.rand(1, 32, 32))
    r = cli("invert", tmp_path / "img.png", "-o", tmp_path / "seeds/", "--model", "bundled",
            "--soft-tokens", token_file, expect=None)
    assert_one_line_error(r, "trained for")


def test_invert_takes_tokens(cli, token_file, tmp_path):
    save_image(tmp_path / "img.png", torch.rand(1, 16, 16))
    cli("invert", tmp_path / "img.png", "-o", tmp_path / "s.pt", "--model", tiny_pixel_path(),
        "--class", "2", "--steps", "3", "--soft-tokens", token_file, "--json")
    assert (tmp_path / "s.pt").exists()


def test_bad_inputs_are_one_line(cli, digits_folder, token_file, tmp_path):
    r = cli("align", digits_folder, "--model", tiny_pixel_path(), "-o", token_file,
            "--max-iters", "1", expect=None)
    assert_one_line_error(r, "exists")
    r = cli("align", digits_folder, "--model", tiny_pixel_path(), "-o", tmp_path / "x.pt",
            expect=None)
    assert_one_line_error(r, ".safetensors")
    r = cli("align", digits_folder, "--model", tiny_pixel_path(), "-o", tmp_path / "x."
            "safetensors", "--loss", "nope", expect=None)
    assert_one_line_error(r, "--loss")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "missing.png", "label": 1}\n')
    r = cli("align", bad, "--model", tiny_pixel_path(), "-o", tmp_path / "y.safetensors",
            expect=None)
    assert_one_line_error(r, "missing.png")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    save_latent(tmp_path / "z.pt", torch.randn(TINY_PIXEL_LATENT))
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "o", "--model", tiny_pixel_path(),
            "--soft-tokens", tmp_path / "junk.safetensors", expect=None)
    assert_one_line_error(r, "junk.safetensors")
    assert not (tmp_path / "o").exists()


def test_default_data_is_the_bundled_digits(cli, tmp_path):
    out = tmp_path / "tokens.safetensors"
    r = cli("align", "--model", "bundled", "-o", out, "--max-iters", "1", "--batch-size", "2",
            "--json")
    summary = json.loads(r.stdout)
    assert summary["examples"] == 4500 and summary["parameters"] == 11 * 64
    assert load_tokens(out).meta["data"].startswith("bundled digits")


def test_optimize_takes_tokens(cli, token_file, tmp_path):
    """--soft-tokens on optimize: the tokens change the optimised render, and a seed optimised
    with tokens is not resumed as one optimised without them."""
    save_latent(tmp_path / "in" / "z.pt", torch.randn(TINY_PIXEL_LATENT,
                                                      generator=torch.Generator().manual_seed(2)))
    common = ["--reward", "class:1", "--model", tiny_pixel_path(), "--class", "1", "--steps",
              "2", "--iters", "1", "--json"]
    plain = json.loads(cli("optimize", tmp_path / "in", "-o", f"{tmp_path / 'plain'}/",
                           *common).stdout)
    tok = json.loads(cli("optimize", tmp_path / "in", "-o", f"{tmp_path / 'tok'}/", *common,
                         "--soft-tokens", token_file).stdout)
    assert plain["seeds"][0] != tok["seeds"][0]
    r = cli("optimize", tmp_path / "in", "-o", f"{tmp_path / 'tok'}/", *common, expect=None)
    assert_one_line_error(r, "different run")
