"""``latentgeo render``: seeds become images (deterministic DDIM through the chosen model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentgeo.cli.common import (
    ClassLabel,
    Device,
    Dtype,
    Force,
    Guidance,
    Json,
    Model,
    Prompt,
    print_json,
    print_table,
)
from latentgeo.cli.rendering import BatchSize
from latentgeo.cli.soft_tokens import SoftTokensFile, read_soft_tokens, use_soft_tokens
from latentgeo.errors import InputError, ShapeError


def load_seeds(items: list[str], latent_shape: tuple[int, ...]):
    """Latent files/directories -> (N, *latent_shape) float32 and one name per seed.

    A file holding one seed (``latent_shape``) gives one seed named after the file; a file with
    a leading batch dimension ((B, *latent_shape)) gives B seeds named ``STEM_000`` ...
    Any other shape is a ShapeError naming both shapes.
    """
    import torch

    from latentgeo.io import expand_latent_paths, load_latent

    seeds, names = [], []
    for p in expand_latent_paths(items):
        x, _ = load_latent(p)
        if tuple(x.shape) == tuple(latent_shape):
            seeds.append(x[None])
            names.append(p.stem)
        elif x.ndim == len(latent_shape) + 1 and tuple(x.shape[1:]) == tuple(latent_shape):
            seeds.append(x)
            names.extend(f"{p.stem}_{i:03d}" for i in range(x.shape[0]))
        else:
            raise ShapeError(f"{p}: seed shape {tuple(x.shape)} does not fit the model, whose "
                             f"seeds have shape {tuple(latent_shape)} (or a batch (N, "
                             f"{', '.join(map(str, latent_shape))}))")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"two seeds would both be written as {dup}.png; rename one file")
    return torch.cat(seeds).to(torch.float32), names


def render(
    seeds: Annotated[list[str], typer.Argument(help="Seed files (.pt/.safetensors) or "
                                               "directories of them.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory for "
                                         "the PNGs.")],
    model: Model = "bundled",
    prompt: Prompt = None,
    class_label: ClassLabel = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="DDIM steps "
                                              "(default: the model's).")] = None,
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
    from latentgeo.cli.rendering import check_targets, condition_from, render_to
    from latentgeo.diffusion import load_model

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory (-o takes a folder)")
    from latentgeo.io import expand_latent_paths

    expand_latent_paths(seeds)  # missing seed files fail before the model loads
    tokens = read_soft_tokens(soft_tokens)
    backend = load_model(model, device, dtype)
    use_soft_tokens(backend, tokens, soft_tokens)
    condition = condition_from(backend, prompt, class_label)
    z, names = load_seeds(seeds, backend.latent_shape)
    check_targets([out / f"{n}.png" for n in names] + ([out / "grid.png"] if grid else []),
                  force)
    result = render_to(out, z, names, model=backend, steps=steps, guidance=guidance,
                       condition=condition, grid=grid, force=force, batch_size=batch_size,
                       quiet=json)
    result.pop("rendered")
    norms = z.flatten(1).norm(dim=1).tolist()
    if json:
        print_json({**result, "seeds": names, "norms": norms,
                    "condition": condition, "shape": list(backend.latent_shape)})
        return
    title = (f"{len(names)} image(s) from {backend.name}, {result['steps']} DDIM steps, "
             f"guidance {result['guidance']:g}")
    print_table(title, ["seed", "norm", "image"], list(zip(names, norms, result["images"])))
    if grid:
        print(f"grid: {result['grid']}")
