"""``latentgeo sample``: reproducible standard-Gaussian seeds."""

from __future__ import annotations

from typing import Annotated

import typer

from latentgeo.cli.common import print_json, print_table
from latentgeo.cli.options import Force, Format, Height, Json, Num, Output, Seed, Width
from latentgeo.errors import InputError
from latentgeo.limits import MAX_ELEMENTS
from latentgeo.presets import LATENT_SHAPES, latent_shape_like


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise InputError(f"--shape {text!r}: expected comma-separated integers, e.g. 4,64,64") \
            from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--shape {text!r}: dimensions must be positive integers")
    if len(shape) > 8:
        raise InputError(f"--shape {text!r}: at most 8 dimensions")
    return shape


def sample(
    output: Output,
    shape: Annotated[str | None, typer.Option("--shape", help="Latent shape, e.g. 4,64,64.")]
    = None,
    like: Annotated[str | None, typer.Option(
        "--like", help=f"The seed shape of a model family: {', '.join(LATENT_SHAPES)} (at "
        "--height/--width, default the family's image size).")] = None,
    height: Height = None,
    width: Width = None,
    n: Num = 1,
    seed: Seed = 0,
    fmt: Format = "safetensors",
    force: Force = False,
    json: Json = False,
) -> None:
    """Draw reproducible N(0, I) seeds and write them to a file or a directory."""
    from latentgeo.io import all_or_nothing, output_is_dir, save_latent, save_latent_set
    from latentgeo.sampling import sample_seeds

    if (shape is None) == (like is None):
        raise InputError("give exactly one of --shape or --like")
    if like is not None and like not in LATENT_SHAPES:
        raise InputError(f"--like {like!r}: unknown preset (choose from "
                         f"{', '.join(LATENT_SHAPES)})")
    if like is None and (height is not None or width is not None):
        raise InputError("--height/--width: give them with --like (--shape is the latent's "
                         "own shape)")
    try:
        dims = latent_shape_like(like, height, width) if like is not None else parse_shape(shape)
    except InputError as e:  # "height 1000: flux needs ..." -> the flag as typed
        raise InputError(f"--{e}") from None
    size = n
    for s in dims:
        size *= s
    if size > MAX_ELEMENTS:
        raise InputError(f"-n {n} seeds of shape {','.join(map(str, dims))} would be {size:,} "
                         f"numbers; one run draws at most {MAX_ELEMENTS:,}")
    z = sample_seeds(n, dims, seed=seed)
    meta = {"method": "sample", "seed": str(seed), "shape": ",".join(map(str, dims))}
    if output_is_dir(output):
        names = [f"seed{seed}_{i:03d}" for i in range(n)]
        with all_or_nothing():
            written = save_latent_set(output, z, names, metadata=meta, force=force,
                                      suffix=f".{fmt}")
    else:
        written = [save_latent(output, z[0] if n == 1 else z, meta, force=force)]
    norms = z.flatten(1).double().norm(dim=1)
    if json:
        print_json({"shape": list(dims), "n": n, "seed": seed, "files": [str(p) for p in written],
                    "norms": norms.tolist()})
    else:
        labels = ([str(p) for p in written] if len(written) == n
                  else [f"{written[0]}[{i}]" for i in range(n)])
        print_table(f"{n} seed(s) of shape {'x'.join(map(str, dims))}", ["latent", "norm"],
                    list(zip(labels, norms.tolist())))
