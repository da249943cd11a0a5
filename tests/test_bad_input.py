"""The bad-input matrix (issue 19, documented in docs/bad-input.md): hostile or broken input to
every command it applies to, run in-process with CliRunner.

Every refusal is checked the same way (:func:`check_refused`): exit status 2; stderr is one
``error:`` line (a usage error may add one ``Usage:`` hint; a batch command prints one
``skipped: NAME: reason`` line per bad item before it); no traceback; no file written or
replaced (a snapshot of the whole test folder before and after, batch commands excepted for
their good items); no temporary file left; nothing executed (marker files of the pickles).
Fixtures are built in each test; tensors are tiny, so the matrix runs in seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentgeo.io import save_latent
from tests.tiny_sd import TINY_PIXEL_LATENT, tiny_pixel_path

SHAPE = (2, 6, 6)  # geometry commands: any shape works


# -- the common assertions ----------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")]


def check_refused(result, root: Path, before: dict[str, str], *fragments: str,
                  batch: bool = False, usage: bool | None = None) -> None:
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr,
                                   result.exception)
    lines = result.stderr.splitlines()
    assert lines and all(ln.strip() for ln in lines), repr(result.stderr)
    if batch:
        *skipped, last = lines
        assert skipped and all(ln.startswith("skipped: ") for ln in skipped), lines
        lines = [last]
    if len(lines) == 2:
        assert usage is not False and lines[1].startswith("Usage: "), lines
    else:
        assert usage is not True and len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "weights_only=False" not in out and "Warning" not in result.stderr
    assert not temp_files(root), temp_files(root)
    after = snapshot(root)
    if batch:  # good items may be written; nothing that existed is replaced
        assert all(after.get(k) == v for k, v in before.items()), "a file was replaced"
    else:
        assert after == before, sorted(set(after) ^ set(before))
    assert not list(root.rglob("PWNED*")), "a pickle ran"


def run_refused(cli, root: Path, args, *fragments: str, **kw):
    before = snapshot(root)
    result = cli(*args, expect=None)
    check_refused(result, root, before, *fragments, **kw)
    return result


def latent(path: Path, seed: int = 0, shape=SHAPE, scale: float = 1.0) -> Path:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    return save_latent(path, x)


# -- item 1: what a latent file may hold --------------------------------------------------------
class _RunsCode:
    """A pickle that would create a marker file if it were ever unpickled unsafely."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil_pt(path: Path, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump({"latent": _RunsCode(str(path.parent / "PWNED")),
                     "metadata": {}}, f, protocol=protocol)


def _evil_zip(path: Path) -> None:
    """A real torch zip file whose data.pkl calls os.system."""
    import zipfile

    good = path.with_name("good_for_zip.pt")
    torch.save({"latent": torch.ones(2)}, good)

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED_zip'}",))

    with zipfile.ZipFile(good) as z, zipfile.ZipFile(path, "w") as out:
        for n in z.namelist():
            data = z.read(n)
            out.writestr(n, pickle.dumps({"latent": System()}, protocol=2)
                         if n.endswith("data.pkl") else data)
    good.unlink()


def _torch_save(obj):
    return lambda p: torch.save(obj, p)


BAD_LATENTS = {
    # name: (writer(path), fragment of the one error line)
    "expanded-4TB": (_torch_save(torch.zeros(1).expand(1, 2**20, 2**20)), "elements"),
    "expanded-small": (_torch_save(torch.zeros(1).expand(*SHAPE)), "repeats its memory"),
    "sparse": (_torch_save(torch.randn(*SHAPE).to_sparse()), "sparse"),
    "float8": (_torch_save(torch.randn(*SHAPE).to(torch.float8_e4m3fn)), "float8"),
    "parameter": (_torch_save(torch.nn.Parameter(torch.randn(*SHAPE))), "Parameter"),
    "int64": (_torch_save(torch.arange(72).reshape(SHAPE)), "int64"),
    "nan": (_torch_save(torch.full(SHAPE, float("nan"))), "NaN"),
    "pickle-p2": (lambda p: _evil_pt(p, 2), "tries to import"),
    "pickle-p4": (lambda p: _evil_pt(p, 4), "tries to import"),
    "pickle-zip-os-system": (_evil_zip, "posix.system"),
    "random-bytes": (lambda p: p.write_bytes(os.urandom(300)), "not a readable latent file"),
    "safetensors-int": (None, "dtype I32"),
}


def _write_bad(root: Path, kind: str) -> Path:
    writer, _ = BAD_LATENTS[kind]
    if kind == "safetensors-int":
        from safetensors.torch import save_file

        path = root / "in" / "bad.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latent": torch.ones(SHAPE, dtype=torch.int32)}, str(path))
        return path
    path = root / "in" / "bad.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path)
    return path


def _loader_args(command: str, bad: Path, good: Path, out: Path) -> list:
    return {"interpolate": ["interpolate", good, bad, "-o", out / "path.pt"],
            "centroid": ["centroid", good, bad, "-o", out / "c.pt"],
            "stats": ["stats", bad],
            "reproject": ["reproject", bad, "-o", f"{out}/"]}[command]


@pytest.mark.parametrize("kind", list(BAD_LATENTS))
@pytest.mark.parametrize("command", ["interpolate", "centroid", "stats", "reproject"])
def test_bad_latent_file_refused(cli, tmp_path, command, kind):
    bad = _write_bad(tmp_path, kind)
    good = latent(tmp_path / "in" / "good.pt")
    r = run_refused(cli, tmp_path, _loader_args(command, bad, good, tmp_path / "out"),
                    BAD_LATENTS[kind][1], str(bad))
    if kind.startswith("pickle"):
        assert "nothing was run" in r.stderr and "tensors only" in r.stderr


@pytest.mark.parametrize("kind", ["pickle-p4", "expanded-4TB", "sparse"])
def test_bad_latent_file_refused_by_render(cli, tmp_path, kind):
    bad = _write_bad(tmp_path, kind)
    run_refused(cli, tmp_path, ["render", bad, "-o", tmp_path / "out", "--model",
                                tiny_pixel_path(), "--steps", "1"], BAD_LATENTS[kind][1])


def test_size_cap_admits_real_batch_files(cli, tmp_path):
    """64 SDXL-sized seeds (4.2 M elements) load; the cap is 2**28."""
    from latentgeo.io import load_latent

    x = torch.zeros(64, 4, 128, 128, dtype=torch.float16)
    save_latent(tmp_path / "batch.safetensors", x)
    assert load_latent(tmp_path / "batch.safetensors")[0].shape == x.shape
    r = cli("stats", tmp_path / "batch.safetensors", "--json")
    assert json.loads(r.stdout)[0]["file"].endswith("batch.safetensors")


# -- batch commands: bad items skipped, good ones written --------------------------------------
@pytest.mark.parametrize("command", ["stats", "reproject", "render"])
def test_batch_skips_bad_items_and_writes_good_ones(cli, tmp_path, command):
    good = latent(tmp_path / "in" / "good.pt", shape=TINY_PIXEL_LATENT)
    bad = _write_bad(tmp_path, "pickle-p2")
    out = tmp_path / "out"
    args = {"stats": ["stats", good, bad],
            "reproject": ["reproject", good, bad, "-o", f"{out}/", "--max-iters", "2"],
            "render": ["render", good, bad, "-o", out, "--model", tiny_pixel_path(),
                       "--steps", "1"]}[command]
    r = run_refused(cli, tmp_path, args, "skipped", batch=True)
    assert sum(ln.startswith("skipped: ") for ln in r.stderr.splitlines()) == 1
    if command == "reproject":
        assert (out / "good.pt").is_file()
    if command == "render":
        assert (out / "good.png").is_file()


# -- item 2: output names planned before writing, unique -------------------------------------
def test_reproject_same_names_from_two_folders(cli, tmp_path):
    a = latent(tmp_path / "d1" / "x.pt", 1)
    b = latent(tmp_path / "d2" / "x.pt", 2)
    r = cli("reproject", a, b, "-o", f"{tmp_path / 'rp'}/", "--json", "--max-iters", "2")
    outs = [row["output"] for row in json.loads(r.stdout)]
    assert sorted(Path(o).name for o in outs) == ["x-2.pt", "x.pt"]
    assert not temp_files(tmp_path)


def test_render_same_names_from_two_folders(cli, tmp_path):
    a = latent(tmp_path / "d1" / "grid.pt", 1, TINY_PIXEL_LATENT)
    b = latent(tmp_path / "d2" / "grid.pt", 2, TINY_PIXEL_LATENT)
    r = cli("render", a, b, "-o", tmp_path / "out", "--model", tiny_pixel_path(), "--steps",
            "1", "--grid", "--json")
    names = sorted(Path(p).name for p in json.loads(r.stdout)["images"])
    assert names == ["grid-2.png", "grid-3.png"]  # 'grid' is grid.png's
    assert (tmp_path / "out" / "grid.png").is_file()


def test_stats_plots_with_equal_stems(cli, tmp_path):
    a = latent(tmp_path / "d1" / "x.pt", 1, (1, 8, 8))
    b = latent(tmp_path / "d2" / "x.pt", 2, (1, 8, 8))
    cli("stats", a, b, "--plot", tmp_path / "p.png")
    assert sorted(p.name for p in tmp_path.glob("p_*.png")) == ["p_x-2.png", "p_x.png"]


def test_unique_names_rule():
    from latentgeo.io import unique_names

    # invert a.png a.jpg a-2.png: three different seeds, the input named a-2 keeps its name
    assert unique_names(["a", "a", "a-2"]) == ["a", "a-3", "a-2"]
    assert unique_names(["A", "a"]) == ["A", "a-2"]  # case-insensitive file systems
    assert unique_names(["centroid", "x"], reserved=["centroid", "grid"]) == ["centroid-2", "x"]


def test_invert_colliding_stems(cli, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "a.jpg", "a-2.png"):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(src / name)
    r = cli("invert", src / "a.png", src / "a.jpg", src / "a-2.png", "-o", f"{tmp_path / 's'}/",
            "--model", tiny_pixel_path(), "--steps", "1", "--fixed-point", "0", "--json")
    seeds = [Path(row["seed"]).name for row in json.loads(r.stdout)["results"]]
    assert seeds == ["a.safetensors", "a-3.safetensors", "a-2.safetensors"]


def test_existing_target_refused_before_anything_is_written(cli, tmp_path):
    a, b = latent(tmp_path / "a.pt", 1), latent(tmp_path / "b.pt", 2)
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "step002.safetensors").write_bytes(b"keep me")
    run_refused(cli, tmp_path, ["interpolate", a, b, "-o", f"{tmp_path / 'steps'}/",
                                "--points", "4"], "step002", "--force")


def test_centroid_render_target_exists_writes_no_centroid(cli, tmp_path):
    xs = [latent(tmp_path / "in" / f"s{i}.pt", i, TINY_PIXEL_LATENT) for i in range(2)]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "grid.png").write_bytes(b"keep me")
    run_refused(cli, tmp_path, ["centroid", *xs, "-o", tmp_path / "c.pt", "--render",
                                tmp_path / "r", "--model", tiny_pixel_path(), "--steps", "1"],
                "grid.png", "--force")


def test_centroid_inputs_named_like_the_render_outputs(cli, tmp_path):
    xs = [latent(tmp_path / "in" / f"{n}.pt", i, TINY_PIXEL_LATENT)
          for i, n in enumerate(["centroid", "grid"])]
    cli("centroid", *xs, "-o", tmp_path / "c.pt", "--render", tmp_path / "r", "--model",
        tiny_pixel_path(), "--steps", "1")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "centroid-2.png", "centroid.png", "grid-2.png", "grid.png"]


# -- item 3: validate before writing; no NaN output, no written latent the tool refuses -------
@pytest.mark.parametrize("method", ["slerp", "nlerp", "nao", "nao-reference", "cog"])
@pytest.mark.parametrize("endpoint", ["zero", "denormal"])
def test_interpolate_degenerate_endpoint(cli, tmp_path, method, endpoint):
    a = latent(tmp_path / "a.pt")
    value = 0.0 if endpoint == "zero" else 1e-40
    b = save_latent(tmp_path / "b.pt", torch.full(SHAPE, value))
    r = run_refused(cli, tmp_path, ["interpolate", a, b, "-o", tmp_path / "p.pt", "-m", method,
                                    "--max-iters", "3"], "b.pt", "zero")
    assert "use lerp" not in r.stderr


def test_lerp_through_zero_is_fine_and_json_strict(cli, tmp_path):
    a = latent(tmp_path / "a.pt")
    b = save_latent(tmp_path / "b.pt", torch.zeros(SHAPE))
    r = cli("interpolate", a, b, "-o", tmp_path / "p.pt", "-m", "lerp", "--json")
    info = json.loads(r.stdout, parse_constant=_no_constants)
    assert info["nao_distance"] is None and info["norms"][-1] == 0.0


def test_centroid_of_cancelling_seeds(cli, tmp_path):
    a = latent(tmp_path / "a.pt")
    neg = save_latent(tmp_path / "neg.pt", -torch.load(a)["latent"])
    run_refused(cli, tmp_path, ["centroid", a, neg, "-o", tmp_path / "c.pt", "-m",
                                "euclidean"], "zero latent")


@pytest.mark.parametrize("args, fragment", [
    (["render", "{z}", "-o", "{out}", "--guidance", "nan"], "--guidance"),
    (["render", "{z}", "-o", "{out}", "--guidance", "inf"], "--guidance"),
    (["invert", "{img}", "-o", "{out}/", "--guidance", "nan"], "--guidance"),
    (["invert", "{img}", "-o", "{out}/", "--tol", "nan"], "--tol"),
    (["interpolate", "{z}", "{z}", "-o", "{out}/p.pt", "--render", "{out}", "--guidance",
      "-inf"], "--guidance"),
    (["stats", "{z}", "--alpha", "nan"], "--alpha"),
    (["reproject", "{z}", "-o", "{out}/", "--strength", "nan"], "--strength"),
    (["reproject", "{z}", "-o", "{out}/", "--alpha", "nan"], "--alpha"),
])
def test_non_finite_options_refused(cli, tmp_path, args, fragment):
    z = latent(tmp_path / "z.pt", shape=TINY_PIXEL_LATENT)
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(img)
    filled = [a.format(z=z, out=tmp_path / "out", img=img) for a in args]
    run_refused(cli, tmp_path, filled, fragment, usage=True)


def test_centroid_weights_nan(cli, tmp_path):
    a, b = latent(tmp_path / "a.pt", 1), latent(tmp_path / "b.pt", 2)
    run_refused(cli, tmp_path, ["centroid", a, b, "-o", tmp_path / "c.pt", "--weights",
                                "nan,1"], "--weights")


def test_float_image_with_a_nan_pixel(cli, tmp_path):
    a = np.full((16, 16), 0.5, np.float32)
    a[3, 4] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tif")
    run_refused(cli, tmp_path, ["invert", tmp_path / "nan.tif", "-o", f"{tmp_path / 's'}/",
                                "--model", tiny_pixel_path(), "--steps", "1"], "nan.tif", "NaN")


def test_no_latent_the_tool_refuses_is_ever_written(tmp_path):
    from latentgeo.errors import LatentgeoError

    for bad in (torch.full((3,), float("nan")), torch.ones(3).to(torch.float8_e4m3fn)):
        with pytest.raises(LatentgeoError, match="not writing"):
            save_latent(tmp_path / "z.pt", bad)
    assert not list(tmp_path.iterdir())


# -- item 4: publishing never replaces without --force ---------------------------------------
def test_hard_links_unsupported_fall_back_safely(tmp_path, monkeypatch):
    from latentgeo.errors import OutputExistsError

    def no_links(src, dst, *a, **k):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    save_latent(tmp_path / "z.pt", torch.ones(3))
    with pytest.raises(OutputExistsError):
        save_latent(tmp_path / "z.pt", torch.zeros(3))
    assert torch.equal(torch.load(tmp_path / "z.pt")["latent"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.pt"]


def test_all_or_nothing_rolls_back(tmp_path):
    from latentgeo.io import all_or_nothing

    with pytest.raises(RuntimeError), all_or_nothing():
        save_latent(tmp_path / "new" / "a.pt", torch.ones(3))
        save_latent(tmp_path / "new" / "b.pt", torch.ones(3))
        raise RuntimeError("a later step fails")
    assert not (tmp_path / "new").exists()


# -- item 5: one line instead of a traceback --------------------------------------------------
def test_output_folder_is_a_file(cli, tmp_path):
    (tmp_path / "f").write_text("a file")
    run_refused(cli, tmp_path, ["sample", "--shape", "3", "-o", tmp_path / "f" / "x.pt"],
                str(tmp_path / "f"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_error_while_writing(cli, tmp_path, monkeypatch, code):
    import safetensors.torch

    def failing(*a, **k):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "x.safetensors"))

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    monkeypatch.setattr("latentgeo.io.save_file", failing)
    run_refused(cli, tmp_path, ["sample", "--shape", "3", "-n", "2", "-o",
                                f"{tmp_path / 'out'}/"], os.strerror(code))


@pytest.mark.parametrize("args, fragment", [
    (["sample", "--shape", "100000,100000,100000", "-o", "x.pt"], "numbers"),
    (["sample", "--like", "sdxl", "-n", "1000000000000", "-o", "x.pt"], "numbers"),
    (["sample", "--shape", "1,1,1,1,1,1,1,1,1", "-o", "x.pt"], "dimensions"),
    (["sample", "--shape", "3", "--seed", str(2**64), "-o", "x.pt"], "--seed"),
    (["sample", "--shape", "3", "--seed", "-1", "-o", "x.pt"], "--seed"),
    (["render", "z.pt", "-o", "out", "--steps", str(10**9)], "--steps"),
    (["invert", "z.png", "-o", "out/", "--steps", "0"], "--steps"),
    (["interpolate", "a.pt", "b.pt", "-o", "p.pt", "--points", str(10**9)], "--points"),
    (["render", "z.pt", "-o", "out", "--batch-size", str(10**9)], "--batch-size"),
    (["invert", "z.png", "-o", "out/", "--fixed-point", str(10**9)], "--fixed-point"),
    (["invert", "z.png", "-o", "out/", "--anderson", str(10**6)], "--anderson"),
    (["demo", "-o", "d", "--seed", str(2**63)], "--seed"),
])
def test_huge_or_impossible_numbers_refused_up_front(cli, tmp_path, monkeypatch, args,
                                                     fragment):
    monkeypatch.chdir(tmp_path)
    r = run_refused(cli, tmp_path, args, fragment)
    assert not (tmp_path / "x.pt").exists()
    del r


def _model_variant(root: Path, name: str, edit) -> Path:
    import shutil

    d = root / name
    shutil.copytree(tiny_pixel_path(), d)
    edit(d)
    return d


def _json_edit(rel: str, change):
    def edit(d: Path) -> None:
        p = d / rel
        obj = json.loads(p.read_text()) if p.exists() else {}
        new = change(obj)
        p.write_text(new if isinstance(new, str) else json.dumps(new))
    return edit


def _pipeline_index(index: str):
    def edit(d: Path) -> None:
        (d / "latentgeo.json").unlink()
        (d / "model_index.json").write_text(index)
    return edit


MALFORMED_MODELS = {
    "model_index-empty-object": (_pipeline_index("{}"), "_class_name"),
    "model_index-not-an-object": (_pipeline_index("[1]"), "not a JSON object"),
    "model_index-garbage": (_pipeline_index("{nope"), "unreadable model_index.json"),
    "class-unet-without-classes": (_pipeline_index(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]})), "class-conditional"),
    "latentgeo.json-steps-text": (_json_edit("latentgeo.json",
                                             lambda o: {**o, "steps": "fifty"}), "non-numeric"),
    "latentgeo.json-guidance-nan": (_json_edit("latentgeo.json",
                                               lambda o: {**o, "guidance": "nan"}), "invalid"),
    "latentgeo.json-list": (_json_edit("latentgeo.json", lambda o: "[]"), "not a JSON object"),
    "sample_size-text": (_json_edit("unet/config.json",
                                    lambda o: {**o, "sample_size": "big"}), "sample_size"),
    "sample_size-huge": (_json_edit("unet/config.json",
                                    lambda o: {**o, "sample_size": 10**9}), "sample_size"),
    "in_channels-text": (_json_edit("unet/config.json",
                                    lambda o: {**o, "in_channels": "one"}), "cannot load"),
    "scheduler-missing-class": (_json_edit("scheduler/scheduler_config.json", lambda o: {}),
                                "scheduler"),
}


@pytest.mark.parametrize("kind", list(MALFORMED_MODELS))
def test_malformed_model_folder(cli, tmp_path, kind):
    edit, fragment = MALFORMED_MODELS[kind]
    model = _model_variant(tmp_path, "model", edit)
    z = latent(tmp_path / "z.pt", shape=TINY_PIXEL_LATENT)
    run_refused(cli, tmp_path, ["render", z, "-o", tmp_path / "out", "--model", model,
                                "--steps", "1"], fragment, "model")


def test_rich_markup_in_file_names(cli, tmp_path):
    """Names such as '[red]x[/].pt' are shown as they are (tables and errors), never parsed."""
    good = latent(tmp_path / "[red]x[/].pt", shape=(1, 8, 8))
    r = cli("stats", good)
    assert "[red]x[/].pt" in "".join(r.stdout.split())  # Rich may wrap a long path
    bad = tmp_path / "[" / "]bad[b].pt"  # the path holds '[/'
    bad.parent.mkdir()
    bad.write_bytes(b"junk")
    run_refused(cli, tmp_path, ["stats", bad], "[/]bad[b].pt")
    assert "[b]" in str(bad)
    r = cli("interpolate", good, good, "-o", f"{tmp_path / '[b]out'}/", "-m", "lerp",
            "--points", "2")
    assert "[b]out" in "".join(r.stdout.split())


# -- item 6: strict JSON ----------------------------------------------------------------------
def _no_constants(name):
    raise AssertionError(f"JSON holds {name}")


def test_json_is_strict_for_huge_latents(cli, tmp_path):
    """float32 latents with entries near 1e30 overflow float32 norms; JSON stays strict."""
    a = latent(tmp_path / "a.pt", 1, scale=3e30)
    b = latent(tmp_path / "b.pt", 2, scale=3e30)
    for args in (["interpolate", a, b, "-o", tmp_path / "p.pt", "-m", "lerp", "--json"],
                 ["stats", a, "--json"],
                 ["centroid", a, b, "-o", tmp_path / "c.pt", "-m", "euclidean", "--json"]):
        r = cli(*args, expect=None)
        assert r.exit_code in (0, 2), r.stderr
        if r.exit_code == 0:
            json.loads(r.stdout, parse_constant=_no_constants)
        else:
            assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    r = cli("interpolate", a, b, "-o", tmp_path / "p2.pt", "-m", "lerp", "--json")
    norms = json.loads(r.stdout, parse_constant=_no_constants)["norms"]
    assert all(np.isfinite(norms)) and max(norms) > 1e31


# -- item 8: images -----------------------------------------------------------------------------
def test_decompression_bomb_png(cli, tmp_path):
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100 M pixels, 12 kB
    run_refused(cli, tmp_path, ["invert", tmp_path / "bomb.png", "-o", f"{tmp_path / 's'}/",
                                "--model", tiny_pixel_path(), "--steps", "1"], "bomb.png",
                "pixels")


# -- demo and sample: single-output commands write nothing when refused -----------------------
def test_demo_refusals_write_nothing(cli, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    run_refused(cli, tmp_path, ["demo", "-o", tmp_path / "file"], "not a directory")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "centroids.png").write_bytes(b"keep me")
    run_refused(cli, tmp_path, ["demo", "-o", tmp_path / "d"], "centroids.png", "--force")
    run_refused(cli, tmp_path, ["demo", "-o", tmp_path / "e", "--points", "1000"], "--points",
                usage=True)


def test_interpolate_path_too_large(cli, tmp_path):
    a = latent(tmp_path / "a.pt", shape=(4, 128, 128))
    run_refused(cli, tmp_path, ["interpolate", a, a, "-o", tmp_path / "p.pt", "--points",
                                "90000"], "--points", "limit")


def test_render_never_writes_black_images_for_unrenderable_seeds(cli, tmp_path):
    """Seeds with entries near 1e38 (finite float32) overflow the network: refused, no PNG."""
    z = latent(tmp_path / "huge.pt", shape=TINY_PIXEL_LATENT, scale=3e37)
    run_refused(cli, tmp_path, ["render", z, "-o", tmp_path / "out", "--model",
                                tiny_pixel_path(), "--steps", "2"], "NaN or infinite pixels",
                "huge")


def test_invert_skips_a_seed_that_came_out_non_finite(cli, tmp_path, monkeypatch):
    """A non-finite seed is never written: that image is skipped by name, the others written."""
    import latentgeo.diffusion.inversion as inversion

    real = inversion.invert_images

    def half_nan(*a, **k):
        result = real(*a, **k)
        result.seeds[0] = float("nan")
        return result

    monkeypatch.setattr(inversion, "invert_images", half_nan)
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(src / name)
    r = run_refused(cli, tmp_path, ["invert", src, "-o", f"{tmp_path / 's'}/", "--model",
                                    tiny_pixel_path(), "--steps", "1", "--fixed-point", "0"],
                    "1 input(s) skipped", batch=True)
    assert "a.png: inversion gave NaN" in r.stderr
    # the seeds written (the folder also holds the job's manifest, docs/scale.md)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()
                  if p.suffix == ".safetensors") == ["b.safetensors"]


def test_absurdly_large_latents_for_norm_aware_methods(cli, tmp_path):
    """float64 entries near 1e300 break the NAO arithmetic (math domain errors): one line."""
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64) * 1e300
    a, b = save_latent(tmp_path / "a.pt", x[0]), save_latent(tmp_path / "b.pt", x[1])
    run_refused(cli, tmp_path, ["centroid", a, b, "-o", tmp_path / "c.pt"], "nao centroid")
    run_refused(cli, tmp_path, ["interpolate", a, b, "-o", tmp_path / "p.pt"], "nao path")


def test_float_image_with_infinite_pixels(cli, tmp_path):
    Image.fromarray(np.full((16, 16), np.inf, np.float32), mode="F").save(tmp_path / "inf.tif")
    run_refused(cli, tmp_path, ["invert", tmp_path / "inf.tif", "-o", f"{tmp_path / 's'}/",
                                "--model", tiny_pixel_path(), "--steps", "1"], "inf.tif",
                "infinite")


def test_an_unexpected_exception_is_still_one_line(cli, tmp_path, monkeypatch):
    """A bug (here: an injected RuntimeError) prints one line and exits 1, not a traceback."""
    import latentgeo.sampling

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(latentgeo.sampling, "sample_seeds", broken)
    r = cli("sample", "--shape", "3", "-o", tmp_path / "x.pt", expect=1)
    assert r.stderr.splitlines() == [
        "error: unexpected RuntimeError: boom (a bug; LATENTGEO_DEBUG=1 shows the traceback)"]
    assert not list(tmp_path.iterdir())


def test_two_writers_threads_one_paused_on_an_event(tmp_path, monkeypatch):
    """In-process twin of tests/test_processes.py::test_two_writers_one_new_path: writer A
    has passed the existence check and is paused (threading.Event) inside its writer; writer B
    publishes the same new path; A then fails with OutputExistsError and B's file is intact."""
    import threading

    import latentgeo.io as lio
    from latentgeo.errors import OutputExistsError
    from latentgeo.io import load_latent

    real, paused, go = lio.save_file, threading.Event(), threading.Event()

    def writer(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if threading.current_thread().name == "A":
            paused.set()
            assert go.wait(30)

    monkeypatch.setattr(lio, "save_file", writer)
    target = tmp_path / "z.safetensors"
    outcome = {}

    def run_a():
        try:
            save_latent(target, torch.ones(4))
            outcome["A"] = "written"
        except OutputExistsError as e:
            outcome["A"] = e

    a = threading.Thread(target=run_a, name="A")
    a.start()
    assert paused.wait(30)
    save_latent(target, torch.full((4,), 2.0))  # writer B, in the main thread
    go.set()
    a.join(30)
    assert isinstance(outcome["A"], OutputExistsError)
    assert torch.equal(load_latent(target)[0], torch.full((4,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.safetensors"]


def test_all_or_nothing_under_force_restores_replaced_files(tmp_path, monkeypatch):
    """A publication failing halfway under --force puts back the files already replaced."""
    import latentgeo.io as lio
    from latentgeo.io import all_or_nothing, load_latent

    for name in ("a", "b"):
        save_latent(tmp_path / f"{name}.pt", torch.zeros(3))
    real, calls = lio.publish, []

    def second_fails(tmp, path, force=False):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tmp, path, force)

    monkeypatch.setattr(lio, "publish", second_fails)
    with pytest.raises(OSError), all_or_nothing():
        save_latent(tmp_path / "a.pt", torch.ones(3), force=True)
        save_latent(tmp_path / "b.pt", torch.ones(3), force=True)
    for name in ("a", "b"):
        assert torch.equal(load_latent(tmp_path / f"{name}.pt")[0], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


@pytest.mark.parametrize("kind", ["pickle-p4", "expanded-4TB", "float8"])
def test_bad_latent_file_refused_by_optimize(cli, tmp_path, kind):
    bad = _write_bad(tmp_path, kind)
    run_refused(cli, tmp_path, ["optimize", bad, "-o", tmp_path / "o.pt", "--model",
                                tiny_pixel_path(), "--steps", "1", "--reward", "class:3",
                                "--iters", "1"], BAD_LATENTS[kind][1])


def test_optimize_stderr_has_no_blank_line(cli, tmp_path):
    """No progress bar off a terminal; a stopped seed's warning is one line."""
    z = latent(tmp_path / "huge.pt", shape=TINY_PIXEL_LATENT, scale=3e37)
    r = cli("optimize", z, "-o", tmp_path / "o.pt", "--model", tiny_pixel_path(), "--steps",
            "1", "--reward", "class:3", "--iters", "1")
    assert r.stderr.splitlines() == [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("warning: seed huge") for ln in r.stderr.splitlines())


@pytest.mark.parametrize("bad", ["3/3", "a/b", "1"])
def test_bad_shard_is_one_line_naming_the_flag(cli, tmp_path, bad):
    """The library names the value (``shard '3/3'``); the CLI names its flag."""
    z = latent(tmp_path / "z.pt", shape=TINY_PIXEL_LATENT)
    run_refused(cli, tmp_path, ["render", z, "-o", tmp_path / "out", "--model",
                                tiny_pixel_path(), "--shard", bad], "--shard", bad)
