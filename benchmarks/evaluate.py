"""The papers' tables in miniature, on the bundled model and its classifier, on a CPU.

    python benchmarks/evaluate.py            # full run, writes docs/results/ (~15 min on 2 cores)
    python benchmarks/evaluate.py --quick    # smoke run (< 2 min; the test suite runs it)

Everything starts from held-out MNIST digits (never used to train the model or the classifier):

1. Invert a pool of held-out digits per class to seeds (fixed-point DDIM inversion, guidance 1).
2. Centroid table (NAO paper, rare-concept centroids): for k in K, each class and each draw, the
   centroid of k inverted seeds by every method, rendered *unconditionally*, then classified.
   Accuracy = the render shows the class of its k examples. Feature Fréchet distance between
   classifier features of the renders and of real held-out digits; centroid norm z-score vs chi.
3. Interpolation table: same-class and cross-class pairs of inverted seeds; every method's
   interior points rendered unconditionally; same-class accuracy, confidence, feature FD, and
   the norm z-score profile along the path.
4. Inversion summary (plain vs fixed-point at equal steps) and Gaussianity summary (share of
   seeds/centroids that pass ``gaussianity_stats``; false alarms on fresh noise).

Accuracies carry Wilson 95% intervals, means percentile-bootstrap 95% intervals; every row says
how many renders it rests on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentgeo import chi
from latentgeo.centroids import CENTROIDS
from latentgeo.classifier import load_classifier
from latentgeo.data import load_mnist_split
from latentgeo.diffusion import load_model, render
from latentgeo.diffusion.inversion import invert_images, psnr
from latentgeo.evaluation import bootstrap_interval, frechet_distance, wilson_interval
from latentgeo.gaussianity import gaussianity_stats
from latentgeo.images import label_rows, make_grid, save_image, upscale
from latentgeo.interpolation import INTERPOLATORS
from latentgeo.reprojection import reproject

CENTROID_METHODS = ("euclidean", "normalized", "cog", "spherical", "nao", "nao+reproject")
PATH_METHODS = ("lerp", "slerp", "nlerp", "cog", "nao")


@dataclass
class Settings:
    steps: int
    pool: int  # inverted held-out images per class
    ks: tuple[int, ...]
    draws: int
    same_pairs: int  # same-class pairs per class
    cross_pairs: int  # cross-class pairs in all
    path_points: int  # points of each path including the endpoints
    inversion_images: int
    fresh_noise: int
    seed: int


FULL = Settings(steps=50, pool=12, ks=(3, 5, 10), draws=3, same_pairs=1, cross_pairs=10,
                path_points=7, inversion_images=40, fresh_noise=500, seed=0)
QUICK = Settings(steps=10, pool=4, ks=(3,), draws=1, same_pairs=1, cross_pairs=2,
                 path_points=4, inversion_images=6, fresh_noise=30, seed=0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Judge:
    """The bundled classifier: predictions, confidences and penultimate features."""

    def __init__(self) -> None:
        self.model = load_classifier()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs, feats = [], []
        for chunk in images.split(256):
            f = self.model.features(chunk)
            probs.append(torch.softmax(self.model.head(f), dim=1))
            feats.append(f)
        p = torch.cat(probs).numpy()
        return p.argmax(1), p.max(1), torch.cat(feats).numpy().astype(np.float64)


def centroid_of(method: str, x: torch.Tensor) -> torch.Tensor:
    if method == "nao+reproject":
        return reproject(CENTROIDS["nao"](x), method="fast").latent
    return CENTROIDS[method](x)


def norm_z(z: torch.Tensor) -> np.ndarray:
    flat = z.flatten(1).double()
    return chi.z_score(flat.norm(dim=1), flat.shape[1]).numpy()


def accuracy_cell(hits: np.ndarray) -> str:
    lo, hi = wilson_interval(int(hits.sum()), len(hits))
    return f"{hits.mean():.2f} [{lo:.2f}, {hi:.2f}]"


def mean_cell(values: np.ndarray, seed: int) -> str:
    lo, hi = bootstrap_interval(values, seed=seed)
    return f"{values.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run(cfg: Settings, out: Path) -> str:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    backend = load_model("bundled")
    judge = Judge()
    split = load_mnist_split()
    real_feats = judge(split.heldout_images)[2]
    d = int(np.prod(backend.latent_shape))

    def render_all(seeds: torch.Tensor) -> torch.Tensor:
        return render(backend, seeds, condition=None, steps=cfg.steps, guidance=1.0,
                      batch_size=128)

    # 1. Invert a pool of held-out digits per class. ----------------------------------------
    labels = split.heldout_labels.numpy()
    pool_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:cfg.pool]
                               for c in range(10)])
    t0 = time.perf_counter()
    inv = invert_images(backend, split.heldout_images[pool_idx], condition=None,
                        steps=cfg.steps, guidance=1.0, fixed_point_iters=3, batch_size=128)
    log(f"inverted {len(pool_idx)} held-out digits in {time.perf_counter() - t0:.0f} s")
    seeds = inv.seeds.view(10, cfg.pool, *backend.latent_shape)

    # 2. Centroids. ---------------------------------------------------------------------------
    jobs = []  # (method, k, class)
    cents = []
    for k in cfg.ks:
        for c in range(10):
            for _ in range(cfg.draws):
                members = seeds[c, rng.choice(cfg.pool, size=k, replace=False)]
                for m in CENTROID_METHODS:
                    jobs.append((m, k, c))
                    cents.append(centroid_of(m, members.double()).float())
    cents = torch.stack(cents)
    t0 = time.perf_counter()
    cent_imgs = render_all(cents)
    pred, conf, feats = judge(cent_imgs)
    log(f"rendered {len(cents)} centroids in {time.perf_counter() - t0:.0f} s")
    zs = norm_z(cents)
    passed = np.array([gaussianity_stats(z).passed for z in cents])
    methods = np.array([j[0] for j in jobs])
    ks = np.array([j[1] for j in jobs])
    classes = np.array([j[2] for j in jobs])
    hits = pred == classes

    cent_rows = []
    for m in CENTROID_METHODS:
        sel = methods == m
        row = [m]
        row += [accuracy_cell(hits[sel & (ks == k)]) for k in cfg.ks]
        row += [mean_cell(conf[sel], cfg.seed), f"{frechet_distance(feats[sel], real_feats):.2f}",
                f"{zs[sel].mean():+.1f}", f"{passed[sel].mean():.2f}"]
        cent_rows.append(row)
    n_per_cell = 10 * cfg.draws
    cent_cols = (["method"] + [f"accuracy k={k} (n={n_per_cell})" for k in cfg.ks]
                 + [f"max-prob (n={n_per_cell * len(cfg.ks)})", "feature FD",
                    "norm z vs chi", "passes stats"])

    # Grid: one row per method, the first draw of k = 5 (or the middle k) for every class.
    k_show = 5 if 5 in cfg.ks else cfg.ks[0]
    firsts = [next(i for i, j in enumerate(jobs) if j == (m, k_show, c))
              for m in CENTROID_METHODS for c in range(10)]
    save_grid(out / "centroid_grid.png", cent_imgs[firsts], list(CENTROID_METHODS), 10)

    # 3. Interpolation. -----------------------------------------------------------------------
    t = torch.linspace(0, 1, cfg.path_points, dtype=torch.float64)
    pairs = []  # (a, b, class or -1)
    for c in range(10):
        for _ in range(cfg.same_pairs):
            i, j = rng.choice(cfg.pool, size=2, replace=False)
            pairs.append((seeds[c, i], seeds[c, j], c))
    for _ in range(cfg.cross_pairs):
        c1, c2 = rng.choice(10, size=2, replace=False)
        pairs.append((seeds[c1, rng.integers(cfg.pool)], seeds[c2, rng.integers(cfg.pool)], -1))
    path_pts, path_meta = [], []
    profiles = {m: [] for m in PATH_METHODS}
    for m in PATH_METHODS:
        for a, b, c in pairs:
            path = INTERPOLATORS[m](a.double(), b.double(), t).float()
            profiles[m].append(norm_z(path))
            for p in path[1:-1]:
                path_pts.append(p)
                path_meta.append((m, c))
    path_pts = torch.stack(path_pts)
    t0 = time.perf_counter()
    ppred, pconf, pfeats = judge(render_all(path_pts))
    log(f"rendered {len(path_pts)} path points in {time.perf_counter() - t0:.0f} s")
    pm = np.array([x[0] for x in path_meta])
    pc = np.array([x[1] for x in path_meta])
    interp_rows = []
    for m in PATH_METHODS:
        same, cross = (pm == m) & (pc >= 0), (pm == m) & (pc < 0)
        prof = np.array(profiles[m])
        interp_rows.append([
            m, accuracy_cell(ppred[same] == pc[same]), mean_cell(pconf[same], cfg.seed),
            mean_cell(pconf[cross], cfg.seed),
            f"{frechet_distance(pfeats[pm == m], real_feats):.2f}",
            f"{prof[:, 1:-1].min(axis=1).mean():+.1f}",
        ])
    n_same = 10 * cfg.same_pairs * (cfg.path_points - 2)
    n_cross = cfg.cross_pairs * (cfg.path_points - 2)
    interp_cols = ["method", f"same-class accuracy (n={n_same})",
                   f"same-class max-prob (n={n_same})", f"cross-class max-prob (n={n_cross})",
                   f"feature FD (n={n_same + n_cross})", "lowest interior norm z (mean)"]
    save_profiles(out / "norm_profiles.png", t.numpy(), profiles)
    a, b, _ = pairs[0]
    strip = torch.stack([INTERPOLATORS[m](a.double(), b.double(), t).float()
                         for m in PATH_METHODS]).flatten(0, 1)
    save_grid(out / "interpolation_grid.png", render_all(strip), list(PATH_METHODS),
              cfg.path_points)

    # 4. Inversion and Gaussianity summaries. --------------------------------------------------
    imgs = split.heldout_images[pool_idx[:: max(1, len(pool_idx) // cfg.inversion_images)]]
    inv_rows = []
    for name, iters in (("plain DDIM inversion", 0), ("fixed-point (3 iters)", 3)):
        r = invert_images(backend, imgs, steps=cfg.steps, guidance=1.0,
                          fixed_point_iters=iters, batch_size=128)
        back = render_all(r.seeds)
        p = psnr(back, imgs).numpy()
        inv_rows.append([name, f"{r.nfe.double().mean():.0f}", mean_cell(p, cfg.seed),
                         f"{norm_z(r.seeds).mean():+.2f}"])
    fresh = torch.randn(cfg.fresh_noise, *backend.latent_shape,
                        generator=torch.Generator().manual_seed(cfg.seed))
    fa = np.array([not gaussianity_stats(z).passed for z in fresh])
    seed_pass = np.array([gaussianity_stats(z).passed for z in inv.seeds])
    gauss_rows = [["fresh N(0, I) seeds (false alarms)", accuracy_cell(fa)],
                  ["inverted held-out seeds rejected", accuracy_cell(~seed_pass)]]
    gauss_rows += [[f"{m} centroids rejected", accuracy_cell(~passed[methods == m])]
                   for m in CENTROID_METHODS]

    report = "\n\n".join([
        "# Evaluation on the bundled model",
        f"Regenerate: `python benchmarks/evaluate.py{' --quick' if cfg is QUICK else ''}` "
        f"(seed {cfg.seed}, {cfg.steps} DDIM steps, unconditional renders, held-out digits "
        f"only: {cfg.pool} inverted per class). Brackets: 95% intervals (Wilson for "
        "accuracies, percentile bootstrap for means). Feature FD: Fréchet distance between "
        "classifier penultimate features of the renders and of the 500 real held-out digits "
        "(lower is better).",
        f"## Centroids of k inverted digits (d = {d})",
        "Accuracy: the unconditional render of the centroid is classified as the class of its "
        "k examples.",
        markdown_table(cent_cols, cent_rows),
        f"![centroids, k={k_show}](centroid_grid.png)",
        "## Interpolation between inverted digits",
        f"{cfg.path_points}-point paths, interior points rendered; "
        f"{10 * cfg.same_pairs} same-class and {cfg.cross_pairs} cross-class pairs.",
        markdown_table(interp_cols, interp_rows),
        "![norm profiles](norm_profiles.png)\n\n![paths](interpolation_grid.png)",
        f"## Inversion ({len(imgs)} held-out digits, {cfg.steps} steps, render-back PSNR)",
        markdown_table(["method", "NFE / image", "PSNR dB", "seed norm z"], inv_rows),
        "## Gaussianity (`gaussianity_stats`, alpha = 0.01)",
        markdown_table(["latents", "rejection rate"], gauss_rows),
    ]) + "\n"
    (out / "README.md").write_text(report)
    (out / "results.json").write_text(json.dumps(
        {"settings": cfg.__dict__, "centroids": cent_rows, "interpolation": interp_rows,
         "inversion": inv_rows, "gaussianity": gauss_rows}, indent=1, default=str))
    return report


def save_grid(path: Path, images: torch.Tensor, row_labels: list[str], ncol: int) -> None:
    grid = make_grid(upscale(images, 2), nrow=ncol)
    save_image(path, label_rows(grid, row_labels, cell_height=64), force=True)


def save_profiles(path: Path, t: np.ndarray, profiles: dict[str, list[np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, prof in profiles.items():
        ax.plot(t, np.mean(prof, axis=0), marker="o", label=m)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("t along the path")
    ax.set_ylabel("norm z-score vs chi (mean over pairs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test settings (~1-2 min)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default docs/results, or a temp-like "
                             "docs/results-quick with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg.seed = args.seed
    out = args.out or Path("docs/results-quick" if args.quick else "docs/results")
    t0 = time.perf_counter()
    report = run(cfg, out)
    print(report)
    log(f"done in {time.perf_counter() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
