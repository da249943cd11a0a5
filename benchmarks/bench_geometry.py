"""Exact NAO geometry vs the paper's discretised optimiser, same inputs, one run.

    python benchmarks/bench_geometry.py [--quick] [--ref-iters N] [--threads K]

Interpolation: d in {1024, 16384, 65536}, seed pairs on the chi shell and off it (norms x0.8 and
x1.2, as inverted seeds are). Centroids: N in {2, 5, 20}. For each case both methods get the
same inputs; the table shows wall time (best of repeats) and process CPU time of the exact
method, the reference's time and iteration count, their ratio, and the yardsticks:

* interpolation: true NAO length (fine quadrature) of a 50-point polyline of each path (ours
  sampled at equal Euclidean arc length along the exact geodesic, the reference's own 50
  points), plus the exact geodesic length D;
* frame spacing (same run): the true NAO length of the 9 frames' polyline, divided by D, for
  each spacing of the exact geodesic (``spacings.SPACINGS``; ``euclidean`` is the default,
  ``nao`` the old equal-NAO-arc default), for the paper's optimiser (the 9 points
  ``nao-reference`` returns, at equal NAO length of its polyline, and its own 50 points) and
  for the straight line (lerp);
* centroids: the paper's objective sum_i D(c, x_i) - log p(|c|) of each centroid (--power 2:
  the Frechet objective), with D from the exact solver, the exact centroid's Newton iteration
  count and its relative gradient (fresh fine-grid solves).

Timings are single-threaded by default (--threads 1 sets torch and the BLAS/OpenMP pools), so
CPU time is one core's and comparable on a loaded machine; wall and CPU are both shown.

The reference runs at most --ref-iters Adam iterations (the paper: 10,000 with early
stopping); when it hits the cap the ratio is a lower bound (marked '>=').
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# Single-threaded by default (the machine is shared): BLAS/OpenMP pools read these once, at
# import; --threads K overrides.
if "--threads" in sys.argv or "OMP_NUM_THREADS" not in os.environ:
    _k = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _k

import torch

from latentgeo import centroids, chi, interpolation
from latentgeo.metric import NAOMetric
from latentgeo.spacings import DEFAULT_SPACING, SPACINGS


def _timed(fn, repeats):
    best_wall, best_cpu, out = math.inf, math.inf, None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return out, best_wall, best_cpu


def _pair(d, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    sa, sb = {"shell": (1.0, 1.0), "off": (0.8, 1.2)}[case]
    return sa * torch.randn(d, generator=g), sb * torch.randn(d, generator=g)


def _set(d, n, case, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if case == "off":
        x = x * torch.where(torch.arange(n) % 2 == 0, 0.8, 1.2)[:, None]
    return x


def bench_interpolation(dims, cases, ref_iters, repeats):
    rows = []
    t9 = torch.linspace(0, 1, 9)
    for d in dims:
        metric = NAOMetric(d)
        for case in cases:
            a, b = _pair(d, case)
            interpolation.nao(a, b, t9)  # warm-up (imports, shell constants)
            _, wall, cpu = _timed(lambda a=a, b=b: interpolation.nao(a, b, t9), repeats)
            ours50 = interpolation.nao(a, b, torch.linspace(0, 1, 50), spacing="euclidean")
            iters = []
            w0 = time.perf_counter()
            ref50 = interpolation.nao_reference(a, b, [0.0, 1.0], max_iters=ref_iters,
                                                return_path=True,
                                                callback=lambda i, v, it=iters: it.append(i))
            ref_wall = time.perf_counter() - w0
            n_it = len(iters)
            D = float(metric.dist(a, b))
            rows.append({
                "d": d, "case": case, "exact_ms": 1e3 * wall, "exact_cpu_ms": 1e3 * cpu,
                "ref_s": ref_wall, "ref_iters": n_it,
                "ratio": ("≥" if n_it >= ref_iters else "") + f"{ref_wall / wall:,.0f}x",
                "D": D, "L_exact50": float(metric.length(ours50)),
                "L_ref50": float(metric.length(ref50)),
            })
            # frame spacing: true NAO length of each 9-frame polyline / D
            for name in SPACINGS:
                rows[-1][name] = float(metric.length(interpolation.nao(a, b, t9, spacing=name))) / D
            ref9 = interpolation.resample_polyline(ref50, t9.double(), metric)
            rows[-1]["ref9"] = float(metric.length(ref9)) / D
            rows[-1]["lerp"] = float(metric.length(interpolation.lerp(a, b, t9))) / D
            rows[-1]["ref9/default"] = f"{rows[-1]['ref9'] / rows[-1][DEFAULT_SPACING]:.2f}x"
            rows[-1]["ours50/D"] = rows[-1]["L_exact50"] / D
            rows[-1]["ref50/D"] = rows[-1]["L_ref50"] / D
            print(rows[-1], flush=True)
    return rows


def bench_centroids(dims, ns, cases, ref_iters, repeats, power=1):
    rows = []
    for d in dims:
        for n in ns:
            for case in cases:
                x = _set(d, n, case)
                centroids.nao(x, power=power)  # warm-up
                c, wall, cpu = _timed(lambda x=x: centroids.nao(x, power=power), repeats)
                _, info = centroids.nao(x, power=power, return_info=True)
                iters = []
                w0, c0 = time.perf_counter(), time.process_time()
                cref = centroids.nao_reference(x, power=power, max_iters=ref_iters,
                                               callback=lambda i, v, it=iters: it.append(i))
                ref_wall, ref_cpu = time.perf_counter() - w0, time.process_time() - c0
                n_it = len(iters)
                capped = n_it >= ref_iters
                rows.append({
                    "d": d, "N": n, "case": case, "exact_ms": 1e3 * wall,
                    "exact_cpu_ms": 1e3 * cpu, "newton_it": info["iterations"],
                    "ref_s": ref_wall, "ref_cpu_s": ref_cpu,
                    "ref_iters": f"{n_it} ({'capped' if capped else 'converged'})",
                    "ratio": ("≥" if capped else "") + f"{ref_wall / wall:,.0f}x",
                    "J_exact": centroids.nao_objective_of(c, x, power=power),
                    "J_ref": centroids.nao_objective_of(cref, x, power=power),
                    "grad_rel": info["gradient_norm"] / (
                        float(chi.weight(float(c.norm()), d))
                        * sum(power * D ** (power - 1) for D in info["distances"])),
                })
                print(rows[-1], flush=True)
    return rows


def _table(title, cols, rows):
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(*(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
        Console(width=200).print(t)
    except ImportError:  # pragma: no cover
        print(title)
        for r in rows:
            print("  ".join(str(r[c]) for c in cols))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d in {1024, 16384}, fewer cases")
    p.add_argument("--ref-iters", type=int, default=None,
                   help="iteration cap of the reference (default 10,000; --quick: 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/BLAS/OpenMP threads (default 1: CPU time of one core)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-centroids", action="store_true")
    p.add_argument("--skip-interpolation", action="store_true")
    p.add_argument("--power", type=int, default=1, choices=(1, 2),
                   help="centroid objective: 1 = paper (with prior), 2 = Frechet mean")
    p.add_argument("--ns", default="2,5,20", help="centroid set sizes, comma-separated")
    p.add_argument("--dims", default=None,
                   help="dimensions, comma-separated (default 1024,16384,65536; --quick: "
                        "1024,16384)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref_iters = args.ref_iters or (200 if args.quick else 10_000)
    if args.dims:
        dims = [int(v) for v in args.dims.split(",")]
    else:
        dims = [1024, 16384] if args.quick else [1024, 16384, 65536]
    print(f"torch threads: {torch.get_num_threads()}, reference cap: {ref_iters} iterations, "
          f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.skip_interpolation:
        rows = bench_interpolation(dims, ["shell", "off"], ref_iters, args.repeats)
        _table("NAO interpolation, 9 points: exact (planar solver) vs nao-reference (Adam)",
               ["d", "case", "exact_ms", "exact_cpu_ms", "ref_s", "ref_iters", "ratio", "D",
                "L_exact50", "L_ref50"], rows)
        _table("NAO frame spacing, 9 frames: true NAO length of the frames' polyline / geodesic "
               f"distance D (exact geodesic with each spacing, default {DEFAULT_SPACING!r}; "
               "ref9: the 9 frames the paper's optimiser returns; lerp: the straight line); "
               "ref9/default: their ratio; 50 points: ours (euclidean) and the optimiser's own",
               ["d", "case", "D", *SPACINGS, "ref9", "lerp", "ref9/default", "ours50/D",
                "ref50/D"], rows)
    if not args.skip_centroids:
        ns = [int(v) for v in args.ns.split(",")]
        cdims = [1024, 16384] if args.quick and not args.dims else dims
        rows = bench_centroids(cdims, ns, ["shell", "off"] if not args.quick else ["off"],
                               ref_iters, max(1, args.repeats // 2), args.power)
        _table(f"NAO centroid (power {args.power}): exact (span + polar Newton) vs "
               "nao-reference (joint Adam); J = objective with fresh N_GRID planar solves, "
               "grad_rel = |grad J| / sum p D^(p-1) w(|c|) at the exact centroid",
               ["d", "N", "case", "exact_ms", "exact_cpu_ms", "newton_it", "ref_s",
                "ref_cpu_s", "ref_iters", "ratio", "J_exact", "J_ref", "grad_rel"], rows)


if __name__ == "__main__":
    main()
