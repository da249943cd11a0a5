"""``latentgeo render``: seeds become images (deterministic DDIM through the chosen model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentgeo.cli.common import print_json, print_table
from latentgeo.cli.jobrun import fail_or_warn
from latentgeo.cli.options import (
    BatchSize,
    ClassLabel,
    Device,
    Dtype,
    Force,
    Guidance,
    Height,
    ImageFolder,
    Json,
    Model,
    Offload,
    Prompt,
    Shard,
    Steps,
    Width,
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
    height: Height = None,
    width: Width = None,
    offload: Offload = False,
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png with all "
                                       "images.")] = False,
    batch_size: BatchSize = 16,
    shard: Shard = None,
    soft_tokens: SoftTokensFile = None,
    force: Force = False,
    json: Json = False,
) -> None:
    """Render seeds to PNG images (one per seed, named after the seed) with deterministic DDIM.

    The bundled digit model takes --class 0-9 (default: unconditional); Stable Diffusion
    pipelines take --prompt. Same seed and settings give the same image, bit for bit on CPU.

    Seeds stream through in chunks of --batch-size and each PNG is written when its chunk is
    done, with its provenance inside. A re-run skips images already there from the same seeds
    and options (so an interrupted run resumes), refuses ones made otherwise (--force redoes
    them), and logs every seed in OUTPUT/manifest-*.jsonl. Under torchrun or accelerate launch
    each process renders its own share; --shard I/N splits the work for job arrays.
    """
    from latentgeo.cli.jobrun import render_job, summary_rows, this_process
    from latentgeo.cli.rendering import condition_from
    from latentgeo.diffusion import load_model
    from latentgeo.io import latent_file_names

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory (-o takes a folder)")

    launch, my_shard, my_device = this_process(shard, device)
    paths = latent_file_names(seeds)  # missing seed files fail before the model loads
    tokens = read_soft_tokens(soft_tokens)
    backend = load_model(model, my_device, dtype, height=height, width=width, offload=offload)
    use_soft_tokens(backend, tokens, soft_tokens)
    condition = condition_from(backend, prompt, class_label)
    result, header = render_job(backend, paths, out, condition=condition, steps=steps,
                                guidance=guidance, batch_size=batch_size, grid=grid,
                                force=force, quiet=json, keep_rows=json, shard=my_shard,
                                launch=launch)
    rows = result.rows
    if json:
        print_json({**{k: v for k, v in header.items() if k != "problems"},
                    "images": [r["image"] for r in rows],
                    "seeds": [r["seed"] for r in rows], "norms": [r["norm"] for r in rows],
                    "skipped": header["problems"],
                    "resumed": [r["seed"] for r in rows if r.get("skipped")],
                    "failed": [it.source for it, _ in result.failed],
                    "shard": [my_shard.index, my_shard.count],
                    "condition": condition, "shape": list(backend.latent_shape)})
    else:
        title = (f"{result.report.n_done} image(s) from {backend.name}, {header['steps']} "
                 f"DDIM steps, guidance {header['guidance']:g}"
                 + (f", shard {my_shard.index}/{my_shard.count}" if my_shard.count > 1 else "")
                 + (f"; {len(result.report.skipped)} already there" if result.report.skipped
                    else ""))
        if rows:
            print_table(title, ["seed", "norm", "image"],
                        [[r["seed"], "" if r["norm"] is None else r["norm"], r["image"]]
                         for r in rows])
        else:
            print_table(title, ["", "seeds"], summary_rows(result))
        if "grid" in header:
            print(f"grid: {header['grid']}")
    fail_or_warn(result, result.report.n_done, problems=header.pop("problems"))
