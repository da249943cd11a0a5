"""``latentgeo render`` end to end with a tiny bundled-format model (--model PATH)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentgeo.io import save_latent
from tests.conftest import assert_one_line_error
from tests.tiny_sd import TINY_PIXEL_LATENT, tiny_pixel_path, tiny_sd_path


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny_pixel_path())


@pytest.fixture
def seeds_dir(tmp_path, cli):
    cli("sample", "--shape", ",".join(map(str, TINY_PIXEL_LATENT)), "-n", "3", "--seed", "1",
        "-o", f"{tmp_path / 'seeds'}/")
    return tmp_path / "seeds"


def test_render_writes_one_png_per_seed_and_a_grid(cli, tmp_path, seeds_dir, model):
    out = tmp_path / "out"
    r = cli("render", seeds_dir, "-o", out, "--model", model, "--class", "3", "--steps", "2",
            "--grid")
    names = sorted(p.stem for p in seeds_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.png" for n in names] + ["grid.png", "manifest-00000-of-00001.jsonl"])
    with Image.open(out / f"{names[0]}.png") as im:
        assert im.mode == "L" and im.size == (16, 16)
    assert names[0] in r.stdout
    first = (out / f"{names[0]}.png").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    # The same command again skips every image (same seeds, same options: resume) ...
    r = cli("render", seeds_dir, "-o", out, "--model", model, "--class", "3", "--steps", "2",
            "--grid")
    assert "3 already there" in " ".join(r.stdout.split())
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps
    # ... other options are refused (nothing rewritten) unless --force; re-render is identical.
    r = cli("render", seeds_dir, "-o", out, "--model", model, "--class", "4", "--steps", "2",
            expect=2)
    assert_one_line_error(r, "exists", "condition 3 -> 4", "--force")
    cli("render", seeds_dir, "-o", out, "--model", model, "--class", "3", "--steps", "2",
        "--force")
    assert (out / f"{names[0]}.png").read_bytes() == first
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} != stamps


def test_render_batch_file_and_json(cli, tmp_path, model):
    z = torch.randn((2, *TINY_PIXEL_LATENT), generator=torch.Generator().manual_seed(0))
    save_latent(tmp_path / "pair.safetensors", z)
    r = cli("render", tmp_path / "pair.safetensors", "-o", tmp_path / "out", "--model", model,
            "--steps", "2", "--guidance", "1", "--json")
    info = json.loads(r.stdout)
    assert info["seeds"] == ["pair_000", "pair_001"] and info["steps"] == 2
    assert info["guidance"] == 1.0 and info["condition"] is None
    img = np.asarray(Image.open(info["images"][1]))
    assert img.shape == (16, 16) and img.dtype == np.uint8


def test_wrong_shape_names_both_shapes(cli, tmp_path, model):
    save_latent(tmp_path / "sd.pt", torch.randn(4, 8, 8))
    r = cli("render", tmp_path / "sd.pt", "-o", tmp_path / "out", "--model", model, expect=2)
    assert_one_line_error(r, "(4, 8, 8)", "(1, 16, 16)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,fragments", [
    (["--model", "no-such-org/no-such-model-xyz"], ["no-such-org/no-such-model-xyz",
                                                     "never downloads"]),
    (["--prompt", "a cat"], ["--prompt"]),
    (["--class", "12"], ["--class 12"]),
    (["--class", "1", "--prompt", "x"], ["not both"]),
    (["--dtype", "int8"], ["int8"]),
])
def test_one_line_errors(cli, tmp_path, seeds_dir, model, args, fragments):
    full = ["render", seeds_dir, "-o", tmp_path / "out", "--model", model, *args]
    r = cli(*full, expect=2)
    assert_one_line_error(r, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable(cli, tmp_path, seeds_dir, model):
    r = cli("render", seeds_dir, "-o", tmp_path / "o", "--model", model, "--device", "cuda",
            expect=2)
    assert_one_line_error(r, "CUDA is not available")


def test_help_lists_options(cli):
    r = cli("render", "--help")
    for opt in ("--model", "--prompt", "--class", "--steps", "--guidance", "--device", "--dtype",
                "--grid", "--json"):
        assert opt in r.stdout


def test_demo_renders_every_method(cli, tmp_path, model, monkeypatch):
    from latentgeo.cli import demo as demo_module
    from latentgeo.interpolation import INTERPOLATORS

    monkeypatch.setattr(demo_module, "REFERENCE_ITERS", 10)
    out = tmp_path / "demo"
    r = cli("demo", "-o", out, "--model", model, "--steps", "2", "--points", "3", "--inputs",
            "2", "--reference", "--json")
    info = json.loads(r.stdout)
    assert [row["method"] for row in info["interpolation"]] == list(INTERPOLATORS)
    for name in INTERPOLATORS:
        assert (out / f"interpolation-{name}.gif").exists()
    with Image.open(out / "interpolation.png") as im:
        # rows = methods; 3 points of 16 px upscaled x8, 2 px padding, plus a label margin.
        assert im.size[1] == len(INTERPOLATORS) * (128 + 2) + 2
    with Image.open(out / "centroids.png") as im:  # inputs, then one row per method
        assert im.size[1] == (1 + len(info["centroids"])) * (128 + 2) + 2
    r = cli("demo", "-o", out, "--model", model, expect=2)
    assert_one_line_error(r, "exists", "--force")


def test_render_job_for_paths_and_centroids(tmp_path, model):
    from latentgeo.cli.rendering import prepare_render
    from latentgeo.errors import OutputExistsError, ShapeError

    z = torch.randn((3, *TINY_PIXEL_LATENT), generator=torch.Generator().manual_seed(3))
    names = [f"step{i:03d}" for i in range(3)]
    job = prepare_render(tmp_path / "r", TINY_PIXEL_LATENT, names, model=model, class_label=2,
                         steps=2, strip=True, quiet=True)
    info = job.path(z)
    assert [p.split("/")[-1] for p in info["images"]] == [f"{n}.png" for n in names]
    with Image.open(info["gif"]) as im:
        assert im.n_frames == 4  # a -> b -> a
    with Image.open(info["strip"]) as im:
        assert im.size == (3 * (128 + 2) + 2, 128 + 4)
    with pytest.raises(OutputExistsError):
        prepare_render(tmp_path / "r", TINY_PIXEL_LATENT, names, model=model, strip=True)
    with pytest.raises(ShapeError, match=r"\(4, 8, 8\).*\(1, 16, 16\)"):
        prepare_render(tmp_path / "s", (4, 8, 8), names, model=model)
    assert prepare_render(None, (4, 8, 8), names, model="no/such") is None

    job = prepare_render(tmp_path / "c", TINY_PIXEL_LATENT, ["centroid", "a", "b"], model=model,
                         steps=2, grid=True, quiet=True)
    info = job.centroid(z.mean(0), z[:2], ["a", "b"])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.png", "b.png",
                                                                  "centroid.png", "grid.png"]
    with Image.open(info["grid"]) as im:  # centroid, gap, 2 inputs
        assert im.size == (4 * (128 + 2) + 2, 128 + 4)


def test_interpolate_and_centroid_render(cli, tmp_path, seeds_dir, model):
    a, b, c = sorted(seeds_dir.iterdir())
    r = cli("interpolate", a, b, "-o", tmp_path / "path.pt", "-m", "slerp", "--points", "4",
            "--render", tmp_path / "ri", "--model", model, "--steps", "2", "--json")
    info = json.loads(r.stdout)["render"]
    assert len(info["images"]) == 4 and info["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "ri").iterdir()) == [
        "path.gif", "step000.png", "step001.png", "step002.png", "step003.png", "strip.png"]
    r = cli("centroid", seeds_dir, "-o", tmp_path / "c.pt", "-m", "cog", "--render",
            tmp_path / "rc", "--model", model, "--steps", "2", "--class", "4")
    assert "grid.png" in r.stdout or (tmp_path / "rc" / "grid.png").exists()
    assert sorted(p.name for p in (tmp_path / "rc").iterdir()) == sorted(
        ["centroid.png", "grid.png", *(f"{p.stem}.png" for p in (a, b, c))])
    # A model that does not fit the latents is refused before anything is written.
    r = cli("interpolate", a, b, "-o", tmp_path / "p2.pt", "--render", tmp_path / "r2",
            "--model", tiny_sd_path(), expect=2)
    assert_one_line_error(r, "(1, 16, 16)", "(4, 8, 8)")
    assert not (tmp_path / "p2.pt").exists() and not (tmp_path / "r2").exists()
