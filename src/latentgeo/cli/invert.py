"""``latentgeo invert``: images -> seeds by fixed-point DDIM inversion."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from latentgeo.cli.common import print_json, print_table, progress_bar
from latentgeo.cli.options import (
    BatchSize,
    ClassLabel,
    Device,
    Dtype,
    Force,
    Format,
    Json,
    Model,
    Prompt,
    Steps,
    finite,
)
from latentgeo.cli.soft_tokens import SoftTokensFile, read_soft_tokens, use_soft_tokens
from latentgeo.errors import InputError, LatentgeoError, OutputExistsError

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
        "--fixed-point", min=0, help="Fixed-point iterations per step (0 = plain DDIM "
        "inversion).")] = 3,
    tol: Annotated[float | None, typer.Option(
        "--tol", min=0.0, callback=finite, help="Stop a sample's iterations once its RMS "
        "step residual is below this (default 1e-5).")] = None,
    anderson: Annotated[int, typer.Option(
        "--anderson", min=0, help="Anderson acceleration depth of the fixed-point iteration "
        "(0 = plain iteration).")] = 2,
    check: Annotated[bool, typer.Option(
        "--check", help="Render each seed back and report latent round-trip error and "
        "PSNR.")] = False,
    fmt: Format = "safetensors",
    batch_size: BatchSize = 16,
    soft_tokens: SoftTokensFile = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json: Json = False,
) -> None:
    """Invert images to seeds: DDIM run backwards on the rendering grid, with fixed-point
    refinement so that rendering the seed gives the image back.

    Images are converted to the model's size and channels (greyscale luma or RGB; 16-bit
    scaled by 65535; transparency composited on black for 1-channel models, white for RGB;
    centre-crop to the aspect ratio, Lanczos resize). Unreadable files are reported by name and
    skipped; the good ones are still written, and the exit status is 2.
    """
    import torch

    from latentgeo import __version__
    from latentgeo.chi import norm_z_scores
    from latentgeo.cli.rendering import condition_from
    from latentgeo.diffusion import load_model
    from latentgeo.diffusion.inversion import check_roundtrip, invert_images
    from latentgeo.images import load_image
    from latentgeo.io import output_is_dir, save_latent

    paths, problems = expand_image_inputs(images)
    to_dir = output_is_dir(output)
    names = _unique_names(paths)
    suffix = f".{fmt}"
    targets = [output / f"{n}{suffix}" for n in names] if to_dir else [output]
    if to_dir and output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output}: exists and is not a directory")
    if not force:
        for t in targets:
            if t.exists():
                raise OutputExistsError(f"{t}: exists (use --force to overwrite)")

    tokens = read_soft_tokens(soft_tokens)
    backend = load_model(model, device, dtype) if paths or not problems else None
    if backend is not None:
        use_soft_tokens(backend, tokens, soft_tokens)
    good: list[tuple[Path, str, Path, Any]] = []
    for p, name, target in zip(paths, names, targets if to_dir else [output] * len(paths)):
        if backend is None:
            break
        try:
            img = load_image(p, backend.image_size, backend.image_channels)
        except LatentgeoError as e:
            problems.append(str(e))
            continue
        good.append((p, name, target, img))
    if not good:
        if len(problems) == 1:
            raise InputError(problems[0])
        for msg in problems:
            print(f"skipped: {msg}", file=sys.stderr)
        raise InputError(f"none of the {len(problems)} input(s) could be read")
    condition = condition_from(backend, prompt, class_label)
    n_steps = backend.default_steps if steps is None else int(steps)
    batch = torch.stack([g[3] for g in good])
    n_chunks = -(-batch.shape[0] // batch_size)
    with progress_bar(f"inverting {batch.shape[0]} image(s)", n_chunks * n_steps,
                      quiet=json) as advance:
        result = invert_images(backend, batch, condition=condition, steps=n_steps,
                               guidance=guidance, fixed_point_iters=fixed_point, tol=tol,
                               anderson=anderson, batch_size=batch_size, callback=advance)
    trip = None
    if check:
        with progress_bar(f"rendering {batch.shape[0]} seed(s) back", n_chunks * n_steps,
                          quiet=json) as advance:
            trip = check_roundtrip(backend, result.seeds, result.x0, batch,
                                   condition=condition, steps=n_steps, guidance=guidance,
                                   batch_size=batch_size, callback=advance)

    method = "ddim" if fixed_point == 0 else f"ddim-fixed-point-{fixed_point}"
    meta = {"model": backend.name, "family": backend.family, "steps": str(n_steps),
            "guidance": str(guidance), "method": method, "fixed_point_iters": str(fixed_point),
            "anderson": str(anderson),
            "tol": str(tol if tol is not None else 1e-5), "latentgeo": __version__}
    if prompt is not None:
        meta["prompt"] = prompt
    if class_label is not None:
        meta["class"] = str(class_label)
    if to_dir:
        written = [save_latent(target, result.seeds[i], {**meta, "source": str(p)}, force=force)
                   for i, (p, _, target, _) in enumerate(good)]
    else:
        import json as _json
        sources = _json.dumps([str(g[0]) for g in good])
        written = [save_latent(output, result.seeds, {**meta, "source": sources}, force=force)]

    z = norm_z_scores(result.seeds)
    norms = result.seeds.flatten(1).double().norm(dim=1)
    rows = []
    for i, (p, _name, _target, _) in enumerate(good):
        row = {"image": str(p), "seed": str(written[i] if to_dir else f"{written[0]}[{i}]"),
               "norm": float(norms[i]), "chi_z": float(z[i]), "nfe": int(result.nfe[i]),
               "max_step_residual": float(result.max_residual[i])}
        if trip is not None:
            row["latent_rmse"] = float(trip.latent_rmse[i])
            row["psnr_db"] = float(trip.psnr[i])
        rows.append(row)
    if json:
        print_json({"model": backend.name, "steps": n_steps, "guidance": guidance,
                    "method": method, "results": rows, "skipped": problems})
    else:
        cols = ["image", "seed", "norm", "chi z", "NFE"] + (
            ["latent RMSE", "PSNR dB"] if trip is not None else [])
        table = [[r["image"], r["seed"], r["norm"], r["chi_z"], r["nfe"]]
                 + ([r["latent_rmse"], r["psnr_db"]] if trip is not None else []) for r in rows]
        print_table(f"{len(rows)} image(s) inverted ({method}, {n_steps} steps)", cols, table)
    if problems:
        for msg in problems:
            print(f"skipped: {msg}", file=sys.stderr)
        raise InputError(f"{len(problems)} input(s) skipped, {len(good)} seed(s) written")
