"""CLI: `latentgeo optimize --init ... --reward match:DIR` (issue 14) on the bundled model with
a folder of real PNG digits, bad input, and end to end on the tiny SD pipeline with a tiny CLIP
feature model built in the test."""

from __future__ import annotations

import json

import pytest
import torch

from latentgeo.io import load_latent
from tests.conftest import assert_one_line_error
from tests.test_cli_optimize import tiny_clip  # noqa: F401  (a fixture)
from tests.tiny_sd import TINY_PIXEL_LATENT, TINY_SD_LATENT, tiny_pixel_path, tiny_sd_path


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Four training-split sevens as PNG files."""
    from latentgeo.data import load_mnist_split
    from latentgeo.images import save_image

    folder = tmp_path_factory.mktemp("shots")
    split = load_mnist_split()
    for i, img in enumerate(split.train_images[split.train_labels == 7][:4]):
        save_image(folder / f"seven{i}.png", img)
    return folder


def test_nao_seedselect_on_the_bundled_model(cli, tmp_path, shots):
    """The common case end to end: start seeds (centroid first) are optimised towards the
    examples, the best iterate never worse than the start, seeds named seed_000..."""
    r = cli("optimize", "--init", f"nao:{shots}", "--reward", f"match:{shots}", "-n", "3",
            "--preset", "nao-seedselect", "--steps", "3", "--iters", "2", "-o",
            f"{tmp_path / 'seeds'}/", "--json")
    out = json.loads(r.stdout)
    assert [s["seed"] for s in out["seeds"]] == ["seed_000", "seed_001", "seed_002"]
    assert out["init"]["method"] == "nao" and out["init"]["path"] == [-1, 0, 1]
    assert out["init"]["inversion_nfe"] > 0 and len(out["init"]["references"]) == 4
    assert out["settings"]["steps"] == 20 and out["settings"]["guidance"] == 1.0
    for s in out["seeds"]:
        assert s["reward_after"] >= s["reward_before"] and s["reward_before"] < 0
        # --steps 3: 3 evaluations of 3 forwards; 2 of them followed by a backward (2 x 3)
        # and the checkpointed forwards recomputed (3)
        assert s["nfe"] == 3 * 3 + 2 * (2 * 3 + 3)
        assert s["heldout_before"] < 0  # judge B's version of the loss
    # gradients reach the seeds: every seed improves on its start (the loop keeps its best)
    assert all(s["reward_after"] > s["reward_before"] for s in out["seeds"])
    z, meta = load_latent(tmp_path / "seeds" / "seed_000.safetensors")
    assert z.shape == (1, 32, 32) and meta["rewards"] == f"match:{shots}"


def test_cli_start_seeds_are_the_library_start_seeds(cli, tmp_path, shots):
    """With --iters 0 the written seeds are the start seeds: equal to start_seeds() on the
    folder's images, inverted on the steps the preset renders with."""
    from latentgeo.diffusion import load_model
    from latentgeo.images import load_image_folder
    from latentgeo.optimize import start_seeds

    model = str(tiny_pixel_path())
    cli("optimize", "--init", f"nao:{shots}", "-n", "4", "--reward", "class:7", "--model",
        model, "--preset", "nao-seedselect", "--steps", "3", "--iters", "0", "-o",
        f"{tmp_path / 's'}/")
    backend = load_model(model)
    refs, _, _ = load_image_folder(shots, backend.image_size, backend.image_channels)
    st = start_seeds(backend, refs, 4, "nao", steps=3)
    for i in range(4):
        z, _ = load_latent(tmp_path / "s" / f"seed_{i:03d}.safetensors")
        torch.testing.assert_close(z, st.seeds[i], rtol=0, atol=0)
    # a re-run resumes (same examples, same start seeds): everything already there
    r = cli("optimize", "--init", f"nao:{shots}", "-n", "4", "--reward", "class:7", "--model",
            model, "--preset", "nao-seedselect", "--steps", "3", "--iters", "0", "-o",
            f"{tmp_path / 's'}/", "--json")
    assert json.loads(r.stdout)["resumed"] == [f"seed_{i:03d}" for i in range(4)]


def test_random_init_one_file_and_centroid_init(cli, tmp_path, shots):
    model = str(tiny_pixel_path())
    r = cli("optimize", "--init", "random", "--seed", "5", "-n", "1", "--reward",
            f"match:{shots}", "--model", model, "--steps", "2", "--iters", "1", "-o",
            tmp_path / "one.pt", "--json")
    out = json.loads(r.stdout)
    assert out["init"]["method"] == "random" and out["init"]["inversion_nfe"] == 0
    z, _ = load_latent(tmp_path / "one.pt")
    assert z.shape == TINY_PIXEL_LATENT
    r = cli("optimize", "--init", f"centroid:normalized:{shots}", "-n", "5", "--reward",
            "class:7", "--model", model, "--steps", "2", "--iters", "1", "-o",
            f"{tmp_path / 'c'}/", "--render", tmp_path / "img", "--json")
    out = json.loads(r.stdout)
    assert out["init"]["method"] == "normalized" and out["init"]["path"] == [-1, 0, 1, 2, 3]
    assert (tmp_path / "img" / "seed_004_after.png").is_file()


def test_unreadable_examples_are_named_and_skipped(cli, tmp_path, shots):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(shots, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    r = cli("optimize", "--init", f"nao:{folder}", "--reward", f"match:{folder}", "-n", "2",
            "--model", str(tiny_pixel_path()), "--steps", "2", "--iters", "1", "-o",
            f"{tmp_path / 'o'}/", expect=2)
    lines = r.stderr.splitlines()
    skipped = [ln for ln in lines if ln.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]  # one line, though read for both
    assert lines[-1] == "error: 1 example image(s) skipped, 2 seed(s) written"
    assert "Traceback" not in r.stderr
    assert (tmp_path / "o" / "seed_001.safetensors").is_file()


def test_bad_input_one_line(cli, tmp_path, shots):
    model = str(tiny_pixel_path())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"x")
    (bad / "b.png").write_bytes(b"y")
    one = tmp_path / "one"
    one.mkdir()
    (one / "s.png").write_bytes((shots / "seven0.png").read_bytes())
    o = f"{tmp_path / 'o'}/"
    base = ["--model", model, "--steps", "2", "--iters", "1", "-o", o]
    cases = [
        (["--init", f"nao:{empty}", "-n", "3", "--reward", "class:1"],
         [str(empty), "no image files"]),
        (["--init", "nao:nowhere/", "-n", "3", "--reward", "class:1"], ["nowhere/",
                                                                       "no such directory"]),
        (["--reward", f"match:{empty}", "--init", "random", "-n", "2"], [str(empty)]),
        (["--init", f"nao:{bad}", "-n", "3", "--reward", "class:1"],
         [str(bad), "none of its 2 image file(s) could be read"]),
        (["--init", f"nao:{one}", "-n", "3", "--reward", "class:1"], ["at least 2"]),
        (["--init", "random", "--reward", "class:1"], ["needs -n"]),
        (["-n", "3", "--reward", "class:1"], ["-n/--num needs --init"]),
        (["--reward", "class:1"], ["give SEEDS files, or --init"]),
        (["--init", "nao", "-n", "2", "--reward", "class:1"], ["expected random, nao:DIR"]),
        (["--init", f"centroid:median:{shots}", "-n", "2", "--reward", "class:1"],
         ["unknown centroid method 'median'"]),
        (["--init", "random", "-n", "2", "--reward", "class:1", "--feature-model", "x"],
         ["--feature-model", "match:DIR"]),
    ]
    for args, frags in cases:
        assert_one_line_error(cli("optimize", *args, *base, expect=None), *frags)
    seed = tmp_path / "s.pt"
    torch.save(torch.zeros(TINY_PIXEL_LATENT), seed)
    assert_one_line_error(cli("optimize", seed, "--init", "random", "-n", "2", "--reward",
                              "class:1", *base, expect=None), "give no SEEDS")
    assert_one_line_error(cli("optimize", "--init", "random", "-n", "2", "--reward", "class:1",
                              "--model", model, "-o", tmp_path / "x.pt", expect=None),
                          "2 seeds need an output directory")
    assert not (tmp_path / "o").exists()


def test_help_names_the_new_options(cli):
    r = cli("optimize", "--help")
    assert "--init" in r.stdout and "--feature-model" in r.stdout


def test_tiny_sd_with_a_tiny_clip_feature_model(cli, tmp_path, tiny_clip):  # noqa: F811
    """SD family end to end: RGB examples, CLIP image features from a local folder, gradients
    through the VAE decoder (three decodes: the clean estimates) and CLIP's preprocessing."""
    from latentgeo.images import save_image

    folder = tmp_path / "rgb"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_image(folder / f"x{i}.png", torch.rand((3, 16, 16), generator=g))
    sd = str(tiny_sd_path())
    common = ["--model", sd, "--prompt", "a cat", "--steps", "3", "--iters", "2", "-n", "3",
              "--init", f"nao:{folder}", "--reward", f"match:{folder}"]
    assert_one_line_error(cli("optimize", *common, "-o", f"{tmp_path / 'x'}/", expect=None),
                          "--feature-model")
    r = cli("optimize", *common, "--feature-model", tiny_clip, "--preset", "seedselect",
            "--lr", "1", "-o", f"{tmp_path / 'o'}/", "--json")
    out = json.loads(r.stdout)
    for s in out["seeds"]:
        assert s["reward_after"] >= s["reward_before"]
        assert s["heldout_before"] is None  # CLIP features: no held-out twin
    # gradients through CLIP, three VAE decodes and the sampler move the seeds upwards
    assert any(s["reward_after"] > s["reward_before"] for s in out["seeds"])
    assert any(s["best_iteration"] > 0 for s in out["seeds"])
    z, _ = load_latent(tmp_path / "o" / "seed_002.safetensors")
    assert z.shape == TINY_SD_LATENT
    assert out["init"]["inversion_nfe"] > 0


def test_provenance_of_older_presets_is_unchanged():
    """The SeedSelect fields join a job's provenance only when set, so a folder optimised
    before they existed still resumes."""
    from dataclasses import asdict

    from latentgeo.cli.jobrun import _settings_options
    from latentgeo.optimize import resolve

    old = _settings_options(asdict(resolve("reno")))
    assert "steps" not in old and "guidance" not in old
    assert "decay_at" not in old["optimizer"] and "decay" not in old["optimizer"]
    new = _settings_options(asdict(resolve("nao-seedselect")))
    assert new["steps"] == 20 and new["guidance"] == 1.0
    assert (new["optimizer"]["decay_at"], new["optimizer"]["decay"]) == (3, 0.1)
