"""``latentgeo demo``: the whole idea in one folder of pictures, in under a minute on a CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from latentgeo.cli.common import print_json, print_table
from latentgeo.cli.options import (
    MAX_STEPS,
    Device,
    Dtype,
    Force,
    Height,
    Json,
    Model,
    Offload,
    Seed,
    Width,
)
from latentgeo.errors import InputError

#: Iteration cap for the papers' optimisers with --reference (their default is 10,000).
REFERENCE_ITERS = 200
#: DDIM steps of the demo (fewer than the model's 50, to stay under a minute on 2 CPU cores).
DEMO_STEPS = 25


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")]
    = Path("demo-output"),
    model: Model = "bundled",
    seed: Seed = 0,
    points: Annotated[int, typer.Option("--points", min=3, max=16, help="Points on each "
                                        "interpolation path, endpoints included.")] = 7,
    inputs: Annotated[int, typer.Option("--inputs", min=2, max=16,
                                        help="Seeds averaged by each centroid method.")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=1, max=MAX_STEPS,
                                       help="Diffusion (DDIM) steps.")] = DEMO_STEPS,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Also run the papers' optimisers (nao-reference), capped at "
        f"{REFERENCE_ITERS} iterations (slow: tens of seconds).")] = False,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    height: Height = None,
    width: Width = None,
    offload: Offload = False,
    force: Force = False,
    json: Json = False,
) -> None:
    """Sample two seeds, interpolate them with every method, take the centroid of a few seeds
    with every method, render everything with the bundled model and write comparison grids.

    Writes interpolation.png (one row per method, a -> b), interpolation-<method>.gif and
    centroids.png (the inputs, then one row per centroid method). The iterative reference
    optimisers (nao-reference) are skipped unless --reference.
    """
    import torch

    from latentgeo import chi
    from latentgeo.cli.rendering import check_targets, render_images, view_scale
    from latentgeo.diffusion import load_model
    from latentgeo.images import label_rows, make_grid, save_gif, save_image, upscale
    from latentgeo.sampling import sample_seeds

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    from latentgeo.centroids import CENTROIDS
    from latentgeo.interpolation import INTERPOLATORS
    from latentgeo.metric import NAOMetric

    interpolators, centroids = dict(INTERPOLATORS), dict(CENTROIDS)
    if not reference:
        interpolators = {k: v for k, v in interpolators.items() if not k.endswith("reference")}
        centroids = {k: v for k, v in centroids.items() if not k.endswith("reference")}
    targets = [out / "interpolation.png", out / "centroids.png"]
    targets += [out / f"interpolation-{m}.gif" for m in interpolators]
    check_targets(targets, force)

    backend = load_model(model, device, dtype, height=height, width=width, offload=offload)
    shape = backend.latent_shape
    d = int(torch.Size(shape).numel())
    mode = chi.mode(d)
    ends = sample_seeds(2, shape, seed=seed)
    a, b = ends[0], ends[1]
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float32)
    metric = NAOMetric(d)
    # The papers' optimisers run capped (their default is 10,000 Adam iterations).
    capped = {"max_iters": REFERENCE_ITERS}

    rows: list[dict[str, Any]] = []
    paths: dict[str, torch.Tensor] = {}
    for name, fn in interpolators.items():
        start = time.perf_counter()
        path = fn(a, b, t, **capped) if name.endswith("reference") else fn(a, b, t)
        ms = 1e3 * (time.perf_counter() - start)
        path = path.detach().to(torch.float32).reshape(points, *shape)
        paths[name] = path
        norms = path.flatten(1).norm(dim=1)
        rows.append({"method": name, "ms": ms, "min_norm_over_mode": float(norms.min() / mode),
                     "mid_norm_over_mode": float(norms[points // 2] / mode),
                     "nao_length": float(metric.length(path))})

    xs = sample_seeds(inputs, shape, seed=seed + 1)
    cents: dict[str, torch.Tensor] = {}
    crows: list[dict[str, Any]] = []
    for name, fn in centroids.items():
        start = time.perf_counter()
        c = fn(xs, **capped) if name.endswith("reference") else fn(xs)
        ms = 1e3 * (time.perf_counter() - start)
        cents[name] = c.detach().to(torch.float32).reshape(shape)
        crows.append({"method": name, "ms": ms,
                      "norm_over_mode": float(cents[name].norm() / mode)})

    # One batched render: the two endpoints, every interior path point, inputs, centroids.
    interior = [p[1:-1] for p in paths.values()]
    batch = torch.cat([ends, *interior, xs, *(c[None] for c in cents.values())])
    images = render_images(backend, batch, None, steps, None, batch_size=32, quiet=json)
    img_a, img_b = images[0], images[1]
    k = view_scale(backend)
    cell = backend.image_size[0] * k
    from latentgeo.io import all_or_nothing

    written: list[Path] = []
    with all_or_nothing():  # the demo's files appear together or not at all
        pos = 2
        strips = []
        for name in paths:
            inner = images[pos:pos + points - 2]
            pos += points - 2
            strip = torch.cat([img_a[None], inner, img_b[None]])
            strips.append(strip)
            written.append(save_gif(out / f"interpolation-{name}.gif", upscale(strip, k),
                                    force=force))
        if strips:
            grid = make_grid(upscale(torch.cat(strips), k), nrow=points)
            written.append(save_image(out / "interpolation.png",
                                      label_rows(grid, list(paths), cell), force=force))
        input_imgs = images[pos:pos + inputs]
        pos += inputs
        cent_imgs = images[pos:]
        blank = torch.full_like(input_imgs[0], 0.5)
        cells = list(input_imgs)
        for img in cent_imgs:  # one row per method: its centroid, then blank cells
            cells += [img] + [blank] * (inputs - 1)
        labels = ["inputs", *(f"{name} centroid" for name in cents)]
        grid = make_grid(upscale(torch.stack(cells), k), nrow=inputs)
        written.append(save_image(out / "centroids.png", label_rows(grid, labels, cell),
                                  force=force))

    if json:
        print_json({"model": backend.name, "latent_shape": list(shape), "chi_mode": mode,
                    "interpolation": rows, "centroids": crows,
                    "files": [str(p) for p in written]})
        return
    if not interpolators:
        print("latentgeo.interpolation is not available: no interpolation rows")
    print_table(f"interpolation of 2 seeds (d = {d}, chi mode {mode:.2f}), {points} points",
                ["method", "ms", "min |x| / mode", "mid |x| / mode", "NAO length"],
                [[r["method"], r["ms"], r["min_norm_over_mode"], r["mid_norm_over_mode"],
                  "-" if r["nao_length"] is None else r["nao_length"]] for r in rows])
    if crows:
        print_table(f"centroid of {inputs} seeds", ["method", "ms", "|c| / mode"],
                    [[r["method"], r["ms"], r["norm_over_mode"]] for r in crows])
    print(f"wrote {len(written)} files to {out}/ (interpolation.png: rows = "
          f"{', '.join(paths) or 'none'}; centroids.png: inputs, then "
          f"{', '.join(cents) or 'none'}; {steps} DDIM steps"
          f"{'' if reference else '; add --reference for nao-reference'})")
