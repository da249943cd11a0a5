"""``latentgeo invert``: images -> seeds by fixed-point DDIM inversion."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from latentgeo.cli.common import print_json, print_table, refuse_all_skipped
from latentgeo.cli.options import (
    BatchSize,
    ClassLabel,
    Device,
    Dtype,
    Force,
    Format,
    Height,
    Json,
    Model,
    Offload,
    Prompt,
    Shard,
    Steps,
    Width,
    finite,
)
from latentgeo.cli.soft_tokens import SoftTokensFile, read_soft_tokens, use_soft_tokens
from latentgeo.errors import InputError, OutputExistsError

_GLOB_CHARS = "*?["


def expand_image_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files stay as given, directories become their image files (sorted), glob patterns are
    expanded here too (for quoted patterns). Returns (paths, problems), one problem line per
    input that names nothing usable; duplicates are dropped, order kept."""
    from latentgeo.images import is_image_file

    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and is_image_file(q))
            if not found:
                problems.append(f"{p}: directory has no image files")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif any(c in item for c in _GLOB_CHARS):
            found = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)
                           if Path(m).is_file())
            if not found:
                problems.append(f"{item}: no files match this pattern")
            paths.extend(found)
        else:
            problems.append(f"{p}: no such file or directory")
    return list(dict.fromkeys(paths)), problems


def _unique_names(paths: list[Path]) -> list[str]:
    """File stems, made unique by :func:`latentgeo.io.unique_names` (a later input sharing a
    stem gets the first free -2, -3, ... that no other input is named)."""
    from latentgeo.io import unique_names

    return unique_names([p.stem for p in paths])


def invert(
    images: Annotated[list[str], typer.Argument(
        help="Image files, directories of images, or glob patterns (e.g. 'digits/*.png').",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory for one seed per image (NAME.safetensors), or one "
        "file (.pt/.safetensors) for all seeds as a batch (N, C, H, W).")],
    model: Model = "bundled",
    prompt: Prompt = None,
    class_label: ClassLabel = None,
    steps: Steps = None,
    guidance: Annotated[float, typer.Option(
        "--guidance", callback=finite, help="Classifier-free guidance scale during inversion "
        "(1 = none, the invertible default).")] = 1.0,
    fixed_point: Annotated[int, typer.Option(
        "--fixed-point", min=0, max=1000, help="Fixed-point iterations per step (0 = plain DDIM "
        "inversion).")] = 3,
    tol: Annotated[float | None, typer.Option(
        "--tol", min=0.0, callback=finite, help="Stop a sample's iterations once its RMS "
        "step residual is below this (default 1e-5).")] = None,
    anderson: Annotated[int, typer.Option(
        "--anderson", min=0, max=100, help="Anderson acceleration depth of the fixed-point "
        "iteration (0 = plain iteration).")] = 2,
    check: Annotated[bool, typer.Option(
        "--check", help="Render each seed back and report latent round-trip error and "
        "PSNR.")] = False,
    fmt: Format = "safetensors",
    batch_size: BatchSize = 16,
    shard: Shard = None,
    soft_tokens: SoftTokensFile = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    height: Height = None,
    width: Width = None,
    offload: Offload = False,
    force: Force = False,
    json: Json = False,
) -> None:
    """Invert images to seeds: DDIM run backwards on the rendering grid, with fixed-point
    refinement so that rendering the seed gives the image back.

    Images are converted to the model's size and channels (greyscale luma or RGB; 16-bit
    scaled by 65535; transparency composited on black for 1-channel models, white for RGB;
    centre-crop to the aspect ratio, Lanczos resize). Unreadable files are reported by name and
    skipped; the good ones are still written, and the exit status is 2.

    Into a folder, images stream through in chunks of --batch-size and each seed is written
    when its chunk is done, with its provenance inside. A re-run skips seeds already there from
    the same image and options (so an interrupted run resumes), refuses ones made otherwise
    (--force redoes them), and logs every image in OUTPUT/manifest-*.jsonl. Under torchrun or
    accelerate launch each process inverts its own share; --shard I/N splits the work for job
    arrays.
    """
    from latentgeo.cli.jobrun import invert_job, summary_rows, this_process
    from latentgeo.cli.rendering import condition_from
    from latentgeo.diffusion import load_model
    from latentgeo.io import output_is_dir

    launch, my_shard, my_device = this_process(shard, device)
    paths, problems = expand_image_inputs(images)
    to_dir = output_is_dir(output)
    names = _unique_names(paths)
    if to_dir and output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output}: exists and is not a directory")
    if not paths:
        refuse_all_skipped(problems, "input(s) could be read")
    tokens = read_soft_tokens(soft_tokens)  # a bad token file fails before the model loads
    backend = load_model(model, my_device, dtype, height=height, width=width, offload=offload)
    use_soft_tokens(backend, tokens, soft_tokens)
    condition = condition_from(backend, prompt, class_label)
    result, header = invert_job(
        backend, paths, names, output, to_dir=to_dir, suffix=f".{fmt}", condition=condition,
        prompt=prompt, class_label=class_label, steps=steps, guidance=guidance,
        fixed_point=fixed_point, tol=tol, anderson=anderson, check=check,
        batch_size=batch_size, force=force, quiet=json, keep_rows=json, shard=my_shard,
        launch=launch)
    rep = result.report
    skipped = problems + [why if why.startswith(it.source) else f"{it.source}: {why}"
                          for it, why in rep.failed]
    if not rep.n_done and not rep.skipped and skipped and launch.world_size == 1:
        refuse_all_skipped(skipped, "input(s) could be read")
    rows = [r for r in result.rows if not r.get("skipped")]
    if json:
        print_json({**header, "results": rows, "skipped": skipped,
                    "resumed": [r["seed"] for r in result.rows if r.get("skipped")],
                    "shard": [my_shard.index, my_shard.count]})
    else:
        title = (f"{rep.n_done} image(s) inverted ({header['method']}, {header['steps']} "
                 "steps)"
                 + (f", shard {my_shard.index}/{my_shard.count}" if my_shard.count > 1 else "")
                 + (f"; {len(rep.skipped)} already there" if rep.skipped else ""))
        if rows or not rep.n_done:
            trip = bool(rows) and "psnr_db" in rows[0]
            cols = ["image", "seed", "norm", "chi z", "NFE"] + (
                ["latent RMSE", "PSNR dB"] if trip else [])
            table = [[r["image"], r["seed"], r["norm"], r["chi_z"], r["nfe"]]
                     + ([r["latent_rmse"], r["psnr_db"]] if trip else []) for r in rows]
            print_table(title, cols, table)
        else:
            print_table(title, ["", "images"], summary_rows(result))
    if skipped:
        for msg in skipped:
            print(f"skipped: {msg}", file=sys.stderr)
        message = f"{len(skipped)} input(s) skipped, {rep.n_done} seed(s) written"
        if launch.world_size > 1:
            print(f"warning: {message} (recorded in the manifest; exit 0 under the "
                  "launcher)", file=sys.stderr)
            return
        raise InputError(message)
