"""The paper's toy (Hwang et al. 2025): a checkerboard-structured latent made noise-like again.

Each reprojection method runs on the same checkerboard latent (|N(0,1)| entries with checkerboard
signs, block size per channel: its marginal is exactly Gaussian, only the spatial structure is
wrong). Prints steps, seconds, distance moved and whether `stats` passes. With --render and the
bundled model (1x32x32 seeds), before/after images are written to --out.

    python examples/checkerboard.py [--shape 4,64,64] [--max-steps 300] [--render --out dir]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from latentgeo.gaussianity import gaussianity_stats
from latentgeo.reprojection import METHODS, reproject


def checkerboard(shape: tuple[int, ...], blocks=(8, 4, 16, 2), seed: int = 0) -> torch.Tensor:
    c, h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    signs = torch.stack([((yy // b + xx // b) % 2 * 2 - 1).float() for b in (blocks * c)[:c]])
    return signs * torch.randn(shape, generator=torch.Generator().manual_seed(seed)).abs()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4,64,64")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--render", action="store_true", help="render with the bundled model")
    ap.add_argument("--out", default="checkerboard-output")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    z = checkerboard(shape)
    before = gaussianity_stats(z)
    print(f"checkerboard {args.shape}: stats {'pass' if before.passed else 'FAIL'} "
          f"({', '.join(before.failed)}), adjusted p = {before.adjusted_p:.2g}")
    print(f"{'method':16s} {'steps':>6s} {'seconds':>8s} {'moved/|z|':>9s} {'pass':>5s}  failing")
    results = {}
    for method in args.methods.split(","):
        t = time.perf_counter()
        r = reproject(z, method=method, max_steps=args.max_steps)
        sec = time.perf_counter() - t
        results[method] = r
        print(f"{method:16s} {r.steps:6d} {sec:8.2f} {r.relative_distance:9.3f} "
              f"{'yes' if r.passed else 'no':>5s}  {', '.join(r.after.failed)}")
    if args.render:
        _render(z, results, Path(args.out))


def _render(z, results, out: Path) -> None:
    try:
        from latentgeo.diffusion import load_model, render
        from latentgeo.images import make_grid, to_pil
    except ImportError as e:
        print(f"rendering skipped: {e}")
        return
    try:
        backend = load_model("bundled")
    except Exception as e:  # no bundled weights on this install
        print(f"rendering skipped: {e}")
        return
    if tuple(z.shape) != tuple(backend.latent_shape):
        print(f"rendering skipped: the bundled model needs seeds of shape "
              f"{backend.latent_shape} (use --shape {','.join(map(str, backend.latent_shape))})")
        return
    seeds = torch.stack([z] + [r.latent for r in results.values()])
    images = render(backend, seeds)
    out.mkdir(parents=True, exist_ok=True)
    to_pil(make_grid(images)).save(out / "before_after.png")
    print(f"wrote {out / 'before_after.png'}: checkerboard, then {', '.join(results)}")


if __name__ == "__main__":
    main()
