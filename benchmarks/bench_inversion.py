"""Inversion table: plain DDIM inversion vs fixed-point inversion, round trip through the sampler.

For each data set (held-out MNIST digits the bundled model never trained on, and scikit-learn's
8x8 digits upscaled to 32x32, a data set it never saw) and each method, invert N images, render
the seeds back with the same DDIM grid, and report per image (mean over images):

* NFE: network evaluations per image (inversion only; rendering back costs `steps` more),
* seconds for the inversion of the N images (wall clock, this machine, one run),
* latent RMSE  |ddim_sample(seed) - x0|_rms  and pixel PSNR (dB) of the render vs the input,
* the seeds' norm z-score against chi(d) (0 = a typical Gaussian seed).

Methods compare equal and unequal budgets: the peer users would otherwise pick (diffusers'
``DDIMInverseScheduler`` loop on the same network and grid, for DDIM models), latentgeo's plain
inversion at S steps (NFE S), fixed-point at S steps (NFE <= (1 + k) S), and plain at (1 + k) S
steps (the same NFE spent on a finer grid). Guidance 1, unconditional (null class) by default.
For fixed-point rows the table also says how many inverse steps reached the tolerance and the
residual left at the first inverse step (x_0 -> the least noisy grid level), where convergence is
slowest.

    nice -n 10 .venv/bin/python benchmarks/bench_inversion.py [--n 100] [--steps 50]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from latentgeo.chi import norm_z_scores
from latentgeo.data import load_mnist_split, load_sklearn_digits_32
from latentgeo.diffusion import load_model
from latentgeo.diffusion.inversion import check_roundtrip, invert_images


def run_peer(backend, images, steps, batch_size):
    """diffusers' DDIMInverseScheduler loop (eta = 0) on the backend's network, rendered back
    with our sampler (equal to diffusers' DDIMScheduler loop, tests/test_backends.py)."""
    from diffusers import DDIMInverseScheduler

    inv = DDIMInverseScheduler.from_config(backend.scheduler.config)
    inv.set_timesteps(steps)
    model = backend.model_fn(None, 1.0)
    t0 = time.perf_counter()
    seeds = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = backend.encode(images[start:start + batch_size])
            for t in inv.timesteps:
                x = inv.step(model(x, t), t, x).prev_sample
            seeds.append(x)
    seconds = time.perf_counter() - t0
    seeds = torch.cat(seeds)
    x0 = backend.encode(images)
    trip = check_roundtrip(backend, seeds, x0, images, steps=steps, guidance=1.0,
                           batch_size=batch_size)
    return summary(trip, seeds, float(steps), seconds)


def summary(trip, seeds, nfe, seconds, inv=None):
    finite = torch.isfinite(trip.psnr)
    out = {
        "nfe": nfe,
        "seconds": seconds,
        "rmse": float(trip.latent_rmse.mean()),
        "rmse_max": float(trip.latent_rmse.max()),
        "psnr": float(trip.psnr[finite].mean()) if finite.any() else float("inf"),
        "psnr_min": float(trip.psnr.min()),
        "z": float(norm_z_scores(seeds).mean()),
        "converged": "",
        "first_res": "",
    }
    if inv is not None and inv.fixed_point_iters > 0:
        out["converged"] = f"{float(inv.converged_steps.double().mean()):.1f}/{inv.steps}"
        out["first_res"] = f"{float(torch.nan_to_num(inv.residual[0]).median()):.1e}"
    return out


def run_method(backend, images, steps, k, batch_size, condition):
    t0 = time.perf_counter()
    inv = invert_images(backend, images, condition=condition, steps=steps, guidance=1.0,
                        fixed_point_iters=k, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    trip = check_roundtrip(backend, inv.seeds, inv.x0, images, condition=condition, steps=steps,
                           guidance=1.0, batch_size=batch_size)
    return summary(trip, inv.seeds, float(inv.nfe.double().mean()), seconds, inv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--n", type=int, default=100, help="images per data set")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--fixed-point", type=int, default=3, help="k: iterations per step")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--data", default="mnist,sklearn")
    ap.add_argument("--with-k1", action="store_true", help="also fixed-point with k = 1")
    args = ap.parse_args()

    backend = load_model(args.model)
    s, k = args.steps, args.fixed_point
    methods = []
    if not getattr(backend, "flow", False):
        methods.append((f"diffusers DDIMInverseScheduler, {s} steps (peer)", s, None))
    methods.append((f"plain, {s} steps", s, 0))
    if args.with_k1:
        methods.append((f"fixed-point k=1, {s} steps", s, 1))
    methods += [(f"fixed-point k={k}, {s} steps", s, k),
                (f"plain, {(1 + k) * s} steps (equal NFE)", (1 + k) * s, 0)]
    datasets = {}
    g = torch.Generator().manual_seed(0)
    if "mnist" in args.data:
        held = load_mnist_split().heldout_images
        datasets["held-out MNIST"] = held[torch.randperm(len(held), generator=g)[:args.n]]
    if "sklearn" in args.data:
        sk, _ = load_sklearn_digits_32()
        datasets["sklearn 8x8 -> 32"] = sk[torch.randperm(len(sk), generator=g)[:args.n]]
    console = Console(width=200)
    for name, images in datasets.items():
        table = Table(title=f"DDIM inversion round trip: {name}, N = {len(images)}, "
                            f"model {backend.name}, guidance 1 (null class)")
        for col in ("method", "NFE/img", "seconds", "latent RMSE", "max RMSE", "PSNR dB",
                    "min PSNR", "ΔPSNR vs first", "NFE ratio", "seed chi z",
                    "steps converged", "1st-step residual"):
            table.add_column(col, justify="left" if col == "method" else "right")
        base = None
        for label, steps, iters in methods:
            r = (run_peer(backend, images, steps, args.batch_size) if iters is None else
                 run_method(backend, images, steps, iters, args.batch_size, None))
            print(label, r, flush=True)
            base = base or r
            table.add_row(label, f"{r['nfe']:.1f}", f"{r['seconds']:.1f}", f"{r['rmse']:.2e}",
                          f"{r['rmse_max']:.2e}", f"{r['psnr']:.2f}", f"{r['psnr_min']:.2f}",
                          f"{r['psnr'] - base['psnr']:+.2f}", f"{r['nfe'] / base['nfe']:.2f}x",
                          f"{r['z']:+.2f}", r["converged"], r["first_res"])
        console.print(table)


if __name__ == "__main__":
    main()
