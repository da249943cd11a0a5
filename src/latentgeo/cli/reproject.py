"""``latentgeo reproject``: move latents back to the typical set of N(0, I)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentgeo.cli.common import (
    print_json,
    print_table,
    progress_bar,
    refuse_all_skipped,
    report_skipped,
)
from latentgeo.cli.options import (
    Alpha,
    Force,
    Json,
    Output,
    ReprojectionMethod,
    finite,
    method_option,
)
from latentgeo.errors import InputError

Files = Annotated[list[Path], typer.Argument(help="Latent files (.pt/.safetensors) or "
                                             "directories of them; one latent per file.")]


def reproject(
    files: Files,
    output: Output,
    method: Annotated[ReprojectionMethod, method_option(
        "reprojection method: fast (closed form) or a regulariser")] = "fast",
    strength: Annotated[float, typer.Option(
        "--strength", min=0.0, callback=finite,
        help="Regulariser weight s in |z'-z|^2/d + s R(z').")] = 1.0,
    max_iters: Annotated[int, typer.Option(
        "--max-iters", min=0, max=10_000_000,
        help="Iteration cap of the optimiser (fast: of its iterations).")] = 500,
    alpha: Alpha = 0.01,
    force: Force = False,
    json: Json = False,
) -> None:
    """Reproject each latent to one that passes `stats`, moving it as little as possible.

    Writes one file per input into the output directory, named after it (a repeated name gets
    -2, -3, ...), with provenance metadata. Unreadable inputs are skipped and reported.
    """

    from latentgeo.cli.common import refuse_non_finite
    from latentgeo.cli.rendering import check_targets
    from latentgeo.errors import LatentgeoError
    from latentgeo.io import (
        expand_latent_paths,
        load_latent,
        output_is_dir,
        save_latent,
        unique_names,
    )
    from latentgeo.reprojection import reproject as reproject_latent

    paths = expand_latent_paths(files)
    to_dir = output_is_dir(output)
    if not to_dir and len(paths) > 1:
        raise InputError(f"{output}: several inputs need an output directory (trailing '/')")
    if to_dir and output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    # one output per input, named after it; a repeated name (d1/x.pt d2/x.pt) gets -2, -3, ...
    stems = unique_names([p.stem for p in paths])
    targets = ([output / f"{stem}{p.suffix}" for stem, p in zip(stems, paths)] if to_dir
               else [output])
    check_targets(targets, force)
    results, problems = [], []
    for p, target in zip(paths, targets):
        try:
            z, meta = load_latent(p)
            with progress_bar(f"{p.name} ({method})", max_iters, quiet=json) as advance:
                res = reproject_latent(z, method=method, strength=strength,
                                       max_steps=max_iters, alpha=alpha, callback=advance)
            refuse_non_finite(res.latent, f"{p}: the reprojected latent")
        except LatentgeoError as e:
            problems.append(str(e))
            continue
        meta = {**meta, "method": f"reproject:{method}", "reproject_steps": str(res.steps)}
        save_latent(target, res.latent, meta, force=force)
        results.append((p, target, res))
    if not results:
        refuse_all_skipped(problems, "latent file(s) could be reprojected")
    if json:
        print_json([{"file": str(p), "output": str(t), "method": r.method, "steps": r.steps,
                     "passed_before": r.before.passed, "passed_after": r.after.passed,
                     "adjusted_p_before": r.before.adjusted_p,
                     "adjusted_p_after": r.after.adjusted_p, "distance": r.distance,
                     "relative_distance": r.relative_distance, "failed_after": list(r.after.failed)}
                    for p, t, r in results])
        report_skipped(problems, f"{len(problems)} latent file(s) skipped, "
                                 f"{len(results)} written")
        return
    print_table(f"reproject ({method}, alpha {alpha})",
                ["latent", "steps", "before", "after", "adj. p after", "moved", "moved / |z|"],
                [[str(p), r.steps, "pass" if r.before.passed else "fail",
                  "pass" if r.after.passed else "FAIL " + ",".join(r.after.failed),
                  r.after.adjusted_p, r.distance, r.relative_distance]
                 for p, _, r in results])
    report_skipped(problems, f"{len(problems)} latent file(s) skipped, "
                                 f"{len(results)} written")

