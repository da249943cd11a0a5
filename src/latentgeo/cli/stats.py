"""``latentgeo stats``: how typical is each latent of N(0, I)?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentgeo.cli.common import console, print_json, print_table
from latentgeo.cli.options import Alpha, Force, Json

Files = Annotated[list[Path], typer.Argument(help="Latent files (.pt/.safetensors) or "
                                             "directories of them; one latent per file.")]


def stats(
    files: Files,
    alpha: Alpha = 0.01,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write histogram + QQ + radial power spectrum PNG here (several files: "
        "one PNG each, named <plot stem>_<file stem>.png).")] = None,
    force: Force = False,
    json: Json = False,
) -> None:
    """Test each latent against i.i.d. N(0, 1): norm vs chi, moments 1-8, channels, spectrum.

    The verdict rejects a fresh torch.randn latent with probability <= alpha (Bonferroni over
    the tests; about 0.8 alpha in practice).
    """
    from latentgeo.gaussianity import gaussianity_stats
    from latentgeo.io import expand_latent_paths, load_latent

    paths = expand_latent_paths(files)
    reports = []
    for p in paths:
        z, _ = load_latent(p)
        report = gaussianity_stats(z, alpha)
        reports.append((p, report))
        if plot is not None:
            from latentgeo.plotting import plot_gaussianity

            target = plot if len(paths) == 1 else plot.with_name(f"{plot.stem}_{p.stem}.png")
            plot_gaussianity(z, target, title=p.name, force=force)
    if json:
        print_json([{"file": str(p), **r.to_dict()} for p, r in reports])
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
        verdict = "[green]PASS[/green]" if r.passed else f"[red]FAIL[/red] ({', '.join(r.failed)})"
        console.print(f"{verdict}  adjusted p = {r.adjusted_p:.3g}, alpha = {r.alpha}")
