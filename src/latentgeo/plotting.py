"""Diagnostic figure for one latent: histogram, QQ plot, radial power spectrum (matplotlib, Agg).

matplotlib is imported inside the function (optional dependency ``latentgeo[plot]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.special as sps
import torch

from latentgeo.errors import InputError
from latentgeo.gaussianity import as_channels, gaussianity_stats, normalized_power, spectral_layout
from latentgeo.io import atomic_write


def radial_power(z: torch.Tensor, n_bins: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Radial power spectrum: mean normalised power per radius bin (1 for i.i.d. N(0, 1)).

    z: (C, H, W) or any shape with >= 2 trailing dims -> (radius centres, mean power), float64.
    """
    x = as_channels(z.detach().to(torch.float64).cpu())
    h, w = x.shape[-2:]
    _, _, radius = spectral_layout(h, w)
    p = normalized_power(x).mean(0).numpy()
    r = radius.numpy()
    edges = np.linspace(0.0, r.max() + 1e-12, n_bins + 1)
    which = np.clip(np.digitize(r, edges) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    total = np.bincount(which, weights=p, minlength=n_bins)
    keep = count > 0
    return ((edges[:-1] + edges[1:]) / 2)[keep], total[keep] / count[keep]


def plot_gaussianity(z: torch.Tensor, path: str | os.PathLike, title: str | None = None,
                     force: bool = False) -> Path:
    """Write a PNG: histogram vs the N(0, 1) density, normal QQ plot, radial power spectrum."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plots need matplotlib, which is not installed (pip install "
                         "'latentgeo[plot]')") from None
    report = gaussianity_stats(z)
    x = z.detach().to(torch.float64).cpu().flatten().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.hist(x, bins=80, density=True, color="tab:blue", alpha=0.6, label="latent")
    t = np.linspace(-4.5, 4.5, 300)
    ax.plot(t, np.exp(-t * t / 2) / np.sqrt(2 * np.pi), "k-", lw=1, label="N(0, 1)")
    ax.set_title(f"histogram  (|z| = {report.norm:.1f}, chi mean {report.norm_mean:.1f})")
    ax.legend(fontsize=8)
    ax = axes[1]
    d = x.size
    step = max(1, d // 4000)
    q = sps.ndtri((np.arange(d) + 0.5) / d)[::step]
    ax.plot(q, np.sort(x)[::step], ".", ms=2)
    ax.plot([-4.5, 4.5], [-4.5, 4.5], "k-", lw=1)
    ax.set_xlabel("N(0, 1) quantile")
    ax.set_ylabel("latent quantile")
    ax.set_title("QQ plot")
    ax = axes[2]
    r, p = radial_power(z)
    ax.plot(r, p, "o-", ms=3)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("radial frequency (cycles/sample)")
    ax.set_ylabel("mean |X|^2 / n")
    ax.set_title("radial power spectrum")
    verdict = "passes" if report.passed else f"fails ({', '.join(report.failed)})"
    fig.suptitle(f"{title + ': ' if title else ''}{verdict} at alpha = {report.alpha}")
    fig.tight_layout()
    try:
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=90),
                            force=force)
    finally:
        plt.close(fig)
