"""Acceptance figures of the bundled digit model, judged by the bundled classifier.

Measures (all on the CPU, deterministic seeds):

1. classifier accuracy on the 500 held-out MNIST digits (never trained on) — must be >= 98%;
   and, for scale, the fraction of those real digits it rates max-probability >= 0.9;
2. class-conditional samples: ``--per-class`` seeds (100) per class, ``--steps`` sampler steps
   (default: the model's ``latentgeo.json``, 50; DDIM for the DDPM, Euler for ``--model
   bundled-flow``), classifier-free guidance ``--guidance`` (default: the model's);
   fraction classified as the requested class — must be >= 90% (DDPM) / 95% (flow model);
3. unconditional samples (null class, no guidance): ``--uncond`` seeds (500); fraction whose
   classifier max-probability is >= 0.9 — must be >= 80%; plus the class histogram and the
   feature Fréchet distance to the held-out digits (classifier penultimate features);
4. optionally (``--grid``) a PNG grid, row c = class c (its first 10 seeds), and a last row
   "u" of the first 10 unconditional samples.

Seeds: x_T = torch.randn((N, 1, 32, 32), generator=torch.Generator().manual_seed(--seed)),
conditional seeds first (class-major: seed i has class i // per_class), then the
unconditional ones from a second generator seeded ``--seed + 1``.
Renders go through ``latentgeo.diffusion.render`` (the shipped sampler), split over
``--workers`` processes of one thread each.

    python scripts/check_bundled_model.py --grid docs/bundled_samples.png --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


def _render_chunk(job: tuple) -> torch.Tensor:
    model, seeds, labels, steps, guidance, threads = job
    torch.set_num_threads(threads)
    from latentgeo.diffusion import load_model, render

    backend = load_model(model)
    cond = None if labels is None else [int(c) for c in labels]
    return render(backend, seeds, condition=cond, steps=steps, guidance=guidance,
                  batch_size=len(seeds))


def render_all(model: str, seeds: torch.Tensor, labels: torch.Tensor | None, steps: int,
               guidance: float | None, workers: int, chunk: int = 50) -> torch.Tensor:
    """Render seeds (N, 1, 32, 32) in chunks over ``workers`` processes -> images (N,1,32,32)."""
    jobs = []
    for s in range(0, len(seeds), chunk):
        lab = None if labels is None else labels[s:s + chunk].tolist()
        jobs.append((model, seeds[s:s + chunk], lab, steps, guidance, 1))
    if workers <= 1:
        return torch.cat([_render_chunk(j) for j in jobs])
    with ProcessPoolExecutor(workers) as pool:
        return torch.cat(list(pool.map(_render_chunk, jobs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--classifier", type=Path, default=None,
                   help="classifier folder (default: the bundled one)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--uncond", type=int, default=500)
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's latentgeo.json, 50 for both)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--grid", type=Path, default=None,
                   help="write a sample grid PNG (10 per class, then 10 unconditional)")
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    from latentgeo.classifier import load_classifier
    from latentgeo.data import load_mnist_split
    from latentgeo.diffusion import load_model
    from latentgeo.evaluation import frechet_distance, wilson_interval

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    backend = load_model(args.model)
    guidance = backend.default_guidance if args.guidance is None else args.guidance
    if args.steps is None:
        args.steps = backend.default_steps
    sampler = "Euler (flow)" if getattr(backend, "flow", False) else "DDIM"
    cond_target = 0.95 if getattr(backend, "flow", False) else 0.90
    clf = load_classifier(path=args.classifier)
    split = load_mnist_split()
    with torch.no_grad():
        held_prob = clf(split.heldout_images).softmax(1)
        held_feats = clf.features(split.heldout_images).numpy()
    held_acc = float((held_prob.argmax(1) == split.heldout_labels).float().mean())
    held_confident = float((held_prob.max(1).values >= 0.9).float().mean())

    n_c = 10 * args.per_class
    cond_seeds = torch.randn((n_c, 1, 32, 32), generator=torch.Generator().manual_seed(args.seed))
    cond_labels = torch.arange(10).repeat_interleave(args.per_class)
    unc_seeds = torch.randn((args.uncond, 1, 32, 32),
                            generator=torch.Generator().manual_seed(args.seed + 1))
    cond_imgs = render_all(args.model, cond_seeds, cond_labels, args.steps, guidance,
                           args.workers)
    unc_imgs = render_all(args.model, unc_seeds, None, args.steps, 1.0, args.workers)
    with torch.no_grad():
        cond_pred = clf(cond_imgs).argmax(1)
        unc_prob = torch.softmax(clf(unc_imgs), 1)
        unc_feats = clf.features(unc_imgs).numpy()
        cond_feats = clf.features(cond_imgs).numpy()
    hits = int((cond_pred == cond_labels).sum())
    per_class = [float((cond_pred[cond_labels == c] == c).float().mean()) for c in range(10)]
    confident = int((unc_prob.max(1).values >= 0.9).sum())
    hist = torch.bincount(unc_prob.argmax(1), minlength=10).tolist()
    seconds = time.perf_counter() - t0

    figures = {
        "model": args.model, "sampler": sampler, "steps": args.steps, "guidance": guidance,
        "judge": "a (latentgeo.classifier.load_judge('a'))" if args.classifier is None
                 else str(args.classifier),
        "classifier_heldout_accuracy": held_acc,
        "heldout_confident_fraction": held_confident,
        "conditional_accuracy": hits / n_c,
        "conditional_accuracy_ci95": wilson_interval(hits, n_c),
        "conditional_accuracy_per_class": per_class,
        "conditional_n": n_c,
        "unconditional_confident_fraction": confident / args.uncond,
        "unconditional_confident_ci95": wilson_interval(confident, args.uncond),
        "unconditional_n": args.uncond,
        "unconditional_class_histogram": hist,
        "fd_unconditional_vs_heldout": frechet_distance(unc_feats, held_feats),
        "fd_conditional_vs_heldout": frechet_distance(cond_feats, held_feats),
        "seconds": round(seconds, 1),
    }
    table = Table(title=f"bundled model check ({args.model}, {args.steps} {sampler} steps, "
                        f"guidance {guidance})")
    for col in ("figure", "value", "95% CI", "target"):
        table.add_column(col)
    lo, hi = figures["conditional_accuracy_ci95"]
    table.add_row("classifier held-out accuracy (500)", f"{held_acc:.4f}", "", ">= 0.98")
    table.add_row(f"conditional accuracy ({n_c})", f"{hits / n_c:.4f}", f"{lo:.3f}-{hi:.3f}",
                  f">= {cond_target:.2f}")
    lo, hi = figures["unconditional_confident_ci95"]
    table.add_row(f"unconditional max-prob >= 0.9 ({args.uncond})",
                  f"{confident / args.uncond:.4f}", f"{lo:.3f}-{hi:.3f}", ">= 0.80")
    table.add_row("real held-out max-prob >= 0.9 (500)", f"{held_confident:.4f}", "",
                  "(for scale)")
    table.add_row("feature FD uncond vs held-out", f"{figures['fd_unconditional_vs_heldout']:.3f}",
                  "", "")
    table.add_row("feature FD cond vs held-out", f"{figures['fd_conditional_vs_heldout']:.3f}",
                  "", "")
    table.add_row("per-class conditional accuracy",
                  " ".join(f"{a:.2f}" for a in per_class), "", "")
    table.add_row("unconditional class histogram", " ".join(map(str, hist)), "", "")
    table.add_row("seconds", f"{seconds:.0f}", "", "")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.grid:
        from latentgeo.images import label_rows, make_grid, to_pil, upscale

        k = min(10, args.per_class)
        pick = torch.cat([torch.arange(c * args.per_class, c * args.per_class + k)
                          for c in range(10)])
        cells = [cond_imgs[pick]]
        labels = [str(c) for c in range(10)]
        if args.uncond >= k:
            cells.append(unc_imgs[:k])
            labels.append("u")
        grid = make_grid(upscale(torch.cat(cells), 2), nrow=k, padding=2, pad_value=0.0)
        grid = label_rows(grid, labels, cell_height=64, padding=2)
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        to_pil(grid).save(args.grid)
        print(f"grid -> {args.grid}")


if __name__ == "__main__":
    main()
