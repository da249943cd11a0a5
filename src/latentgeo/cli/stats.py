"""``latentgeo stats``: how typical is each latent of N(0, I)?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from latentgeo.cli.common import (
    console,
    print_json,
    print_table,
    refuse_all_skipped,
    report_skipped,
)
from latentgeo.cli.options import Alpha, Force, Json

Files = Annotated[list[Path], typer.Argument(help="Latent files (.pt/.safetensors) or "
                                             "directories of them; one latent per file.")]


def stats(
    files: Files,
    alpha: Alpha = 0.01,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write histogram + QQ + radial power spectrum PNG here (several files: "
        "one PNG each, named <plot stem>_<file stem>.png; a repeated file stem gets -2, -3, "
        "...).")] = None,
    force: Force = False,
    json: Json = False,
) -> None:
    """Test each latent against i.i.d. N(0, 1): norm vs chi, moments 1-8, channels, spectrum.

    The verdict rejects a fresh torch.randn latent with probability <= alpha (Bonferroni over
    the tests; about 0.8 alpha in practice).
    """

    from latentgeo.errors import LatentgeoError
    from latentgeo.gaussianity import gaussianity_stats
    from latentgeo.io import expand_latent_paths, load_latent, unique_names

    paths = expand_latent_paths(files)
    plots: list[Path | None] = [None] * len(paths)
    if plot is not None:  # every plot name planned (unique) and checked before any is written
        if len(paths) == 1:
            plots = [plot]
        else:
            stems = unique_names([p.stem for p in paths])
            plots = [plot.with_name(f"{plot.stem}_{stem}.png") for stem in stems]
        if not force:
            from latentgeo.cli.rendering import check_targets

            check_targets([q for q in plots if q is not None], force)
    reports, problems = [], []
    for p, target in zip(paths, plots):
        try:
            z, _ = load_latent(p)
            report = gaussianity_stats(z, alpha)
        except LatentgeoError as e:
            problems.append(str(e))
            continue
        reports.append((p, report))
        if target is not None:
            from latentgeo.plotting import plot_gaussianity

            plot_gaussianity(z, target, title=p.name, force=force)
    if not reports:
        refuse_all_skipped(problems, "latent file(s) could be read")
    if json:
        print_json([{"file": str(p), **r.to_dict()} for p, r in reports])
        report_skipped(problems, f"{len(problems)} latent file(s) skipped, "
                                 f"{len(reports)} tested")
        return
    for p, r in reports:
        rows = [[t.name, t.statistic, t.null, t.p_value, "ok" if t.p_value >= r.threshold
                 else "FAIL"] for t in r.tests]
        print_table(f"{p}  shape {'x'.join(map(str, r.shape))}  |z| = {r.norm:.2f} "
                    f"(chi mean {r.norm_mean:.2f}, z = {r.norm_z:+.2f})",
                    ["test", "statistic", "null", "p-value", f"p >= {r.threshold:.2g}"], rows)
        mom = [[n, m, t, se, zz] for n, m, t, se, zz in
               zip(r.moment_orders, r.moments, r.moment_targets, r.moment_se, r.moment_z)]
        print_table("raw moments mean(x^n)", ["n", "value", "N(0,1)", "std. error", "z"], mom)
        verdict = ("[green]PASS[/green]" if r.passed
                   else f"[red]FAIL[/red] ({escape(', '.join(r.failed))})")
        console.print(f"{verdict}  adjusted p = {r.adjusted_p:.3g}, alpha = {r.alpha}")
    report_skipped(problems, f"{len(problems)} latent file(s) skipped, "
                                 f"{len(reports)} tested")

