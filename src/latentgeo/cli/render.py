"""``latentgeo render``: seeds become images (deterministic DDIM through the chosen model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentgeo.cli.common import print_json, print_table
from latentgeo.cli.options import (
    BatchSize,
    ClassLabel,
    Device,
    Dtype,
    Force,
    Guidance,
    ImageFolder,
    Json,
    Model,
    Prompt,
    Steps,
)
from latentgeo.cli.soft_tokens import SoftTokensFile, read_soft_tokens, use_soft_tokens
from latentgeo.errors import InputError


def load_seeds(items: list[str], latent_shape: tuple[int, ...]):
    """Latent files/directories -> ((N, *latent_shape) float32 or None, one name per seed,
    one problem line per file that cannot be used).

    A file holding one seed (``latent_shape``) gives one seed named after the file; a file with
    a leading batch dimension ((B, *latent_shape)) gives B seeds named ``STEM_000`` ...
    Names are made unique by :func:`latentgeo.io.unique_names` (``grid`` is reserved for
    grid.png). A file of any other shape, or one that is not a latent, is a problem naming it.
    """
    import torch

    from latentgeo.errors import LatentgeoError
    from latentgeo.io import expand_latent_paths, load_latent, unique_names

    seeds, names, problems = [], [], []
    for p in expand_latent_paths(items):
        try:
            x, _ = load_latent(p)
        except LatentgeoError as e:
            problems.append(str(e))
            continue
        if tuple(x.shape) == tuple(latent_shape):
            seeds.append(x[None])
            names.append(p.stem)
        elif x.ndim == len(latent_shape) + 1 and tuple(x.shape[1:]) == tuple(latent_shape):
            seeds.append(x)
            names.extend(f"{p.stem}_{i:03d}" for i in range(x.shape[0]))
        else:
            problems.append(f"{p}: seed shape {tuple(x.shape)} does not fit the model, whose "
                            f"seeds have shape {tuple(latent_shape)} (or a batch (N, "
                            f"{', '.join(map(str, latent_shape))}))")
    if not seeds:
        return None, [], problems
    return torch.cat(seeds).to(torch.float32), unique_names(names, reserved=("grid",)), problems


def render(
    seeds: Annotated[list[str], typer.Argument(help="Seed files (.pt/.safetensors) or "
                                               "directories of them.")],
    output: ImageFolder,
    model: Model = "bundled",
    prompt: Prompt = None,
    class_label: ClassLabel = None,
    steps: Steps = None,
    guidance: Guidance = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png with all "
                                       "images.")] = False,
    batch_size: BatchSize = 16,
    soft_tokens: SoftTokensFile = None,
    force: Force = False,
    json: Json = False,
) -> None:
    """Render seeds to PNG images (one per seed, named after the seed) with deterministic DDIM.

    The bundled digit model takes --class 0-9 (default: unconditional); Stable Diffusion
    pipelines take --prompt. Same seed and settings give the same image, bit for bit on CPU.
    """
    import sys

    from latentgeo.cli.rendering import check_targets, condition_from, render_to
    from latentgeo.diffusion import load_model
    from latentgeo.io import expand_latent_paths

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory (-o takes a folder)")
    expand_latent_paths(seeds)  # missing seed files fail before the model loads
    tokens = read_soft_tokens(soft_tokens)
    backend = load_model(model, device, dtype)
    use_soft_tokens(backend, tokens, soft_tokens)
    condition = condition_from(backend, prompt, class_label)
    z, names, problems = load_seeds(seeds, backend.latent_shape)
    if z is None:
        if len(problems) == 1:
            raise InputError(problems[0])
        for msg in problems:
            print(f"skipped: {msg}", file=sys.stderr)
        raise InputError(f"none of the {len(problems)} seed file(s) could be used")
    check_targets([out / f"{n}.png" for n in names] + ([out / "grid.png"] if grid else []),
                  force)
    result = render_to(out, z, names, model=backend, steps=steps, guidance=guidance,
                       condition=condition, grid=grid, force=force, batch_size=batch_size,
                       quiet=json)
    result.pop("rendered")
    norms = z.flatten(1).double().norm(dim=1).tolist()
    if json:
        print_json({**result, "seeds": names, "norms": norms,
                    "condition": condition, "shape": list(backend.latent_shape),
                    "skipped": problems})
    else:
        title = (f"{len(names)} image(s) from {backend.name}, {result['steps']} DDIM steps, "
                 f"guidance {result['guidance']:g}")
        print_table(title, ["seed", "norm", "image"], list(zip(names, norms, result["images"])))
        if grid:
            print(f"grid: {result['grid']}")
    if problems:
        for msg in problems:
            print(f"skipped: {msg}", file=sys.stderr)
        raise InputError(f"{len(problems)} seed file(s) skipped, {len(names)} image(s) written")
