"""``latentgeo centroid``: the centre of a set of seeds by any centroid method.

Computing and writing are separate: ``compute_centroid`` returns the centroid tensor, so
``--render`` (or any caller) can hook in after it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from latentgeo.cli.common import ALL_METHODS_REFERENCE_ITERS, print_json, print_table
from latentgeo.cli.options import (
    CentroidMethod,
    ClassLabel,
    Device,
    Dtype,
    Force,
    Guidance,
    Height,
    Json,
    MaxIters,
    Model,
    Offload,
    OutputFile,
    Prompt,
    Render,
    Steps,
    Width,
    method_option,
)


def parse_weights(text: str | None, n: int):
    """'1,2,3' -> list of n floats; None -> None."""
    from latentgeo.errors import InputError

    if text is None:
        return None
    try:
        w = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--weights {text!r}: expected comma-separated numbers") from None
    if len(w) != n:
        raise InputError(f"--weights has {len(w)} values for {n} seeds")
    if not all(math.isfinite(v) and v >= 0 for v in w) or not any(v > 0 for v in w):
        raise InputError(f"--weights {text!r}: weights must be finite, non-negative and not all "
                         "zero")
    return w


def _mean(values: list[float | None]) -> float | None:
    """Mean, or None when a value is None (a distance from the zero latent: infinite)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def compute_centroid(x, method: str, weights=None, power: int = 1,
                     max_iters: int | None = None):
    """Run one centroid method on a set (N, *shape): returns the centroid (*shape)."""
    from latentgeo.centroids import get_centroid

    fn = get_centroid(method)
    opts: dict[str, Any] = {}
    if method in ("nao", "nao-reference"):
        opts["power"] = power
    if method == "nao-reference" and max_iters is not None:
        opts["max_iters"] = max_iters
    return fn(x, weights, **opts).detach()


def summarize(c, x, names, method: str, weights=None, power: int = 1) -> dict[str, Any]:
    """Norm of the centroid, its NAO distances to the seeds and the NAO objective."""
    from latentgeo import chi
    from latentgeo.centroids import nao_objective_of
    from latentgeo.cli.common import ZERO_RMS, rms
    from latentgeo.metric import NAOMetric

    metric = NAOMetric(x[0].numel())
    if rms(c) < ZERO_RMS:  # e.g. --all-methods: the euclidean mean of x and -x
        dists = [None] * x.shape[0]
        objective = None
    else:
        dists = [float(metric.dist(c, xi)) for xi in x]
        objective = nao_objective_of(c, x, weights, power)
    return {"method": method, "n": int(x.shape[0]), "shape": list(x.shape[1:]),
            "norm": float(c.detach().double().norm()), "chi_mode": chi.mode(x[0].numel()),
            "power": power, "nao_objective": objective,
            "distances": dict(zip(names, dists))}


def centroid(
    seeds: Annotated[list[Path], typer.Argument(help="Latent files, directories of latent "
                                                "files, or one batch file (N, ...).")],
    output: OutputFile,
    method: Annotated[CentroidMethod, method_option("centroid method")] = "nao",
    power: Annotated[int, typer.Option("--power", help="nao: 1 = the paper's objective "
                                       "sum D + prior, 2 = Frechet mean sum D^2.")] = 1,
    weights: Annotated[str | None, typer.Option("--weights", help="Comma-separated weights, "
                                                "one per seed.")] = None,
    max_iters: MaxIters = None,
    all_methods: Annotated[bool, typer.Option("--all-methods", help="Also print a table "
                                              "comparing every method on the seeds.")] = False,
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
    """Centroid of a set of seeds (default: the exact NAO centroid) written to one file.

    --render DIR also renders the centroid (centroid.png) and every input seed with --model and
    --steps diffusion steps, plus grid.png: the centroid beside the inputs' images.
    """
    from latentgeo.centroids import CENTROIDS
    from latentgeo.cli.common import (
        ZERO_RMS,
        numbers_in_range,
        refuse_non_finite,
        refuse_zero,
        rms,
    )
    from latentgeo.cli.rendering import prepare_render
    from latentgeo.errors import InputError
    from latentgeo.io import (
        all_or_nothing,
        load_latent_set,
        output_is_dir,
        save_latent,
        unique_names,
    )

    if power not in (1, 2):
        raise InputError(f"--power {power}: choose 1 or 2")
    if output_is_dir(output):
        raise InputError(f"{output}: the centroid is one latent; give a .pt or .safetensors file")
    x, names = load_latent_set(seeds)
    # image names for --render: unique, and never centroid.png or grid.png
    names = unique_names(names, reserved=("centroid", "grid"))
    w = parse_weights(weights, x.shape[0])
    if method != "euclidean" or all_methods:
        what = "--all-methods" if method == "euclidean" else f"the {method} centroid"
        for xi, name in zip(x, names):
            refuse_zero(xi, name, what)
    job = prepare_render(render, tuple(x.shape[1:]), ["centroid", *names], model, device,
                         dtype, prompt, class_label, steps, guidance, grid=True,
                         force=force, quiet=json, height=height, width=width,
                         offload=offload)
    with numbers_in_range(f"the {method} centroid", x):
        c = compute_centroid(x, method, w, power, max_iters)
    refuse_non_finite(c, f"the {method} centroid")
    if rms(c) < ZERO_RMS:
        raise InputError(f"the {method} centroid of these latents is the zero latent (they "
                         "cancel out), which is no seed; nothing was written")
    with numbers_in_range(f"the {method} centroid's NAO distances", x):
        summary = summarize(c, x, names, method, w, power)
    rows = []
    if all_methods:
        cap = max_iters or ALL_METHODS_REFERENCE_ITERS
        for name in CENTROIDS:
            start = time.perf_counter()
            with numbers_in_range(f"--all-methods: the {name} centroid", x):
                cc = compute_centroid(x, name, w, power, cap)
                ms = 1e3 * (time.perf_counter() - start)
                s = summarize(cc, x, names, name, w, power)
            rows.append({"method": name, "norm": s["norm"], "nao_objective": s["nao_objective"],
                         "mean_distance": _mean(list(s["distances"].values())), "ms": ms})
        summary["all_methods"] = rows
    meta = {"method": method, "power": str(power), "n": str(x.shape[0]),
            "weights": weights or ""}
    with all_or_nothing():  # the centroid and its renders appear together or not at all
        written = save_latent(output, c, meta, force=force)
        summary["file"] = str(written)
        if job is not None:
            summary["render"] = job.centroid(c, x, names)
    if job is not None and not json:
        print(f"rendered the centroid and {len(names)} inputs, grid.png into {render}/")
    if json:
        print_json(summary)
        return
    print_table(f"{method} centroid of {len(names)} seeds -> {written} "
                f"(norm {summary['norm']:.4g}, chi mode {summary['chi_mode']:.4g})",
                ["seed", "NAO distance"], list(summary["distances"].items()))
    print(f"NAO objective (power {power}): {summary['nao_objective']:.6g}")
    if rows:
        print_table(f"every method on the same seeds (nao-reference capped at "
                    f"{max_iters or ALL_METHODS_REFERENCE_ITERS} iterations)",
                    ["method", "norm", "NAO objective", "mean NAO distance", "ms"],
                    [(r["method"], r["norm"], r["nao_objective"], r["mean_distance"], r["ms"])
                     for r in rows])
