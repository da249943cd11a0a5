"""Cost of `gaussianity_stats` and of each regulariser (value + gradient) vs latent size d.

Spectral terms are O(d log d); the covariance regulariser is O(d^2) by construction (every 2-D
lag computed directly). Covariance beyond --max-cov-d is *estimated* from the largest measured
size by d^2 scaling and marked '~'. Prints one table, ratios measured side by side in one run.

    python benchmarks/bench_gaussianity.py [--repeats 5] [--max-cov-d 16384]
"""

from __future__ import annotations

import argparse
import time

import torch

from latentgeo.gaussianity import gaussianity_stats
from latentgeo.regularizers import REGULARIZERS

SHAPES = [(1, 32, 32), (4, 32, 32), (4, 64, 64), (4, 128, 128), (4, 256, 256)]


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _reg_step(f, z):
    def run():
        x = z.clone().requires_grad_(True)
        f(x).backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-cov-d", type=int, default=16384)
    args = ap.parse_args()
    names = list(REGULARIZERS)
    print(f"torch threads {torch.get_num_threads()}; times in ms (best of {args.repeats}); "
          "regularisers: value + gradient")
    header = ["d", "shape", "stats", *names, "cov/spectral"]
    print(" | ".join(f"{h:>15s}" for h in header))
    last_cov = None
    for shape in SHAPES:
        d = shape[0] * shape[1] * shape[2]
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        row = {"stats": _time(lambda z=z: gaussianity_stats(z), args.repeats)}
        for name in names:
            if name == "covariance" and d > args.max_cov_d:
                d0, t0 = last_cov
                row[name] = t0 * (d / d0) ** 2
                row["~cov"] = True
                continue
            row[name] = _time(_reg_step(REGULARIZERS[name], z),
                              1 if name == "covariance" else args.repeats)
            if name == "covariance":
                last_cov = (d, row[name])
        cells = [str(d), "x".join(map(str, shape)), f"{row['stats']:.2f}"]
        for name in names:
            mark = "~" if name == "covariance" and row.get("~cov") else ""
            cells.append(f"{mark}{row[name]:.2f}")
        ratio = row["covariance"] / row["spectral"]
        cells.append(f"{'~' if row.get('~cov') else ''}{ratio:.1f}x")
        print(" | ".join(f"{c:>15s}" for c in cells), flush=True)
    print("~ = estimated from the largest measured covariance by d^2 scaling (too slow/large "
          "to run).")


if __name__ == "__main__":
    main()
