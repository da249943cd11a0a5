"""``latentgeo interpolate``: a path of seeds from A to B by any interpolation method.

Computing and writing are separate: ``compute_path`` returns the (points, *shape) tensor, so
``--render`` (or any caller) can hook in after it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from latentgeo.cli.common import ALL_METHODS_REFERENCE_ITERS, print_json, print_table
from latentgeo.cli.options import (
    ClassLabel,
    Device,
    Dtype,
    Force,
    Format,
    Guidance,
    Height,
    InterpolationMethod,
    Json,
    MaxIters,
    Model,
    Offload,
    Output,
    Points,
    Prompt,
    Render,
    Spacing,
    Steps,
    Width,
    method_option,
)
from latentgeo.spacings import DEFAULT_SPACING, SPACINGS


def compute_path(a, b, method: str, points: int, spacing: str = DEFAULT_SPACING,
                 max_iters: int | None = None):
    """Run one interpolator on two latents: returns (points, *a.shape) float32/64 tensor."""
    from latentgeo.interpolation import get_interpolator
    from latentgeo.interpolation import steps as make_steps

    fn = get_interpolator(method)
    t = make_steps(points)
    opts: dict[str, Any] = {}
    if method == "nao":
        opts["spacing"] = spacing
    if method == "nao-reference" and max_iters is not None:
        opts["max_iters"] = max_iters
    return fn(a, b, t, **opts).detach()


def summarize(path, a, b, method: str) -> dict[str, Any]:
    """Norms along the path (float64), its NAO length (fine quadrature of the polyline) and the
    exact NAO distance of the endpoints (None when one is the zero latent: infinite)."""
    from latentgeo import chi
    from latentgeo.cli.common import ZERO_RMS, rms
    from latentgeo.metric import NAOMetric

    metric = NAOMetric(a.numel())
    norms = path.flatten(1).double().norm(dim=1)
    zero_end = min(rms(a), rms(b)) < ZERO_RMS
    return {"method": method, "points": int(path.shape[0]), "shape": list(a.shape),
            "chi_mode": chi.mode(a.numel()), "norms": norms.tolist(),
            "nao_length": float(metric.length(path)),
            "nao_distance": None if zero_end else float(metric.dist(a, b))}


def _fine_length(method: str, a, b, spacing: str, metric, max_iters: int) -> float:
    """NAO length of a method's curve itself, so coarse step counts do not bias the comparison:
    the exact geodesic length for ``nao``, the optimised 50-point polyline for
    ``nao-reference``, a 257-point polyline for the closed-form methods."""
    if method == "nao":
        return float(metric.dist(a, b))
    if method == "nao-reference":
        from latentgeo.interpolation import nao_reference

        return float(metric.length(nao_reference(a, b, [0.0, 1.0], max_iters=max_iters,
                                                 return_path=True)))
    return float(metric.length(compute_path(a, b, method, 257, spacing)))


def interpolate(
    a: Annotated[Path, typer.Argument(help="First latent file (.pt/.safetensors).")],
    b: Annotated[Path, typer.Argument(help="Second latent file, same shape.")],
    output: Output,
    method: Annotated[InterpolationMethod, method_option("interpolation method")] = "nao",
    points: Points = 9,
    spacing: Annotated[Spacing, typer.Option("--spacing", help="Where method nao puts the points "
                                             "along the exact geodesic: " + "; ".join(
                                                 f"{k}: {v}" for k, v in SPACINGS.items()) + "."
                                             )] = DEFAULT_SPACING,
    max_iters: MaxIters = None,
    all_methods: Annotated[bool, typer.Option("--all-methods", help="Also print a table "
                                              "comparing every method on A and B.")] = False,
    fmt: Format = "safetensors",
    render: Render = None,
    model: Model = "bundled",
    prompt: Prompt = None,
    class_label: ClassLabel = None,
    guidance: Guidance = None,
    steps: Steps = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    height: Height = None,
    width: Width = None,
    offload: Offload = False,
    force: Force = False,
    json: Json = False,
) -> None:
    """Interpolate two seeds (default: the exact NAO geodesic) and write the path.

    -o path.pt writes one (points, ...) tensor; -o dir/ writes one file per point
    (step000.safetensors ...). --render DIR also renders every point with --model and --steps
    diffusion steps (step000.png ...), a strip.png and an animated path.gif.
    """
    import torch

    from latentgeo.cli.common import numbers_in_range, refuse_non_finite, refuse_zero
    from latentgeo.cli.rendering import prepare_render
    from latentgeo.errors import InputError, ShapeError
    from latentgeo.interpolation import INTERPOLATORS
    from latentgeo.io import all_or_nothing, load_latent, save_latent_set
    from latentgeo.limits import MAX_ELEMENTS

    xa, _ = load_latent(a)
    xb, _ = load_latent(b)
    if xa.shape != xb.shape:
        raise ShapeError(f"{a} has shape {tuple(xa.shape)} but {b} has {tuple(xb.shape)}")
    if method != "lerp" or all_methods:
        what = "--all-methods" if method == "lerp" else f"{method} interpolation"
        refuse_zero(xa, str(a), what)
        refuse_zero(xb, str(b), what)
    if points * xa.numel() > MAX_ELEMENTS:
        raise InputError(f"--points {points}: a path of {points} latents of shape "
                         f"{tuple(xa.shape)} would hold {points * xa.numel():,} numbers; the "
                         f"limit is {MAX_ELEMENTS:,}")
    names = [f"step{i:03d}" for i in range(points)]
    job = prepare_render(render, tuple(xa.shape), names, model, device, dtype, prompt,
                         class_label, steps, guidance, strip=True, force=force, quiet=json,
                         height=height, width=width, offload=offload)
    ends = torch.stack([xa, xb])
    with numbers_in_range(f"the {method} path", ends):
        path = compute_path(xa, xb, method, points, spacing, max_iters)
    refuse_non_finite(path, f"the {method} path")
    with numbers_in_range(f"the {method} path's NAO length", ends):
        summary = summarize(path, xa, xb, method)
    rows = []
    if all_methods:
        from latentgeo.metric import NAOMetric

        metric = NAOMetric(xa.numel())
        cap = max_iters or ALL_METHODS_REFERENCE_ITERS
        for name in INTERPOLATORS:
            start = time.perf_counter()
            with numbers_in_range(f"--all-methods: the {name} path", ends):
                p = compute_path(xa, xb, name, points, spacing, cap)
                ms = 1e3 * (time.perf_counter() - start)
                norms = p.flatten(1).double().norm(dim=1)
                rows.append({"method": name, "min_norm": float(norms.min()),
                             "max_norm": float(norms.max()),
                             "nao_length": _fine_length(name, xa, xb, spacing, metric, cap),
                             "ms": ms})
        summary["all_methods"] = rows
    meta = {"method": method, "points": str(points), "a": str(a), "b": str(b)}
    with all_or_nothing():  # the path and its renders appear together or not at all
        written = save_latent_set(output, path, names, metadata=meta, force=force,
                                  suffix=f".{fmt}")
        summary["files"] = [str(p) for p in written]
        if job is not None:
            summary["render"] = job.path(path)
    if job is not None and not json:
        print(f"rendered {points} images, strip.png and path.gif into {render}/")
    if json:
        print_json(summary)
        return
    print_table(f"{method} path, {points} points -> {', '.join(summary['files'][:1])}"
                f"{' ...' if len(written) > 1 else ''}",
                ["point", "norm", "norm / chi mode"],
                [(i, n, n / summary["chi_mode"]) for i, n in enumerate(summary["norms"])])
    dist = summary["nao_distance"]
    print(f"NAO length of the path: {summary['nao_length']:.6g}   "
          f"NAO distance of the endpoints: {'infinite' if dist is None else f'{dist:.6g}'}")
    if rows:
        print_table("every method on the same endpoints (NAO length of each method's curve; "
                    f"nao-reference capped at {max_iters or ALL_METHODS_REFERENCE_ITERS} "
                    "iterations)",
                    ["method", "min norm", "max norm", "NAO length", "ms"],
                    [(r["method"], r["min_norm"], r["max_norm"], r["nao_length"], r["ms"])
                     for r in rows])
