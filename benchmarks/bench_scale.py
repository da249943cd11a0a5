"""Batch work at scale: throughput of processes vs threads, and memory that does not grow with
the number of seeds.

1. Throughput (``--part throughput``): ``latentgeo render`` of ``--seeds`` seeds (default 96,
   ``--steps`` 10) with the bundled model, three ways on the same CPU:
   1 process x 1 thread, 1 process x 2 threads (the default on a 2-core machine), and
   2 processes x 1 thread under ``torchrun --nproc_per_node 2`` (gloo, CPU). Throughput is
   seeds / (last shard's ``end`` - first shard's ``start`` in the manifests): the job loop,
   without interpreter start and model loading, which every process pays once. Target:
   2 x 1 >= 1.7 x the 1 x 1 rate. Each case runs ``--repeats`` times (best of).
2. Memory (``--part memory``): peak resident set (``wait4`` of the child) of
   ``latentgeo render --steps 5`` on 1,000 and on 10,000 seeds, given as a folder of one file per
   seed and as one batch file; growth per extra seed = (RSS(10k) - RSS(1k)) / 9,000, from the
   median peak of ``--mem-repeats`` runs per size (every run is printed). Target: < 1 KB per
   seed (a seed is 4 KB: holding every seed, or every image, fails this); the budget is 9 MiB
   over 9,000 seeds. Sizes are interleaved (1k, 10k, 1k, 10k, ...) and every run is printed
   as it ends, so a cut-short benchmark still gives pairs. Also printed: the Python memory the
   job holds per input (tracemalloc; deterministic), for both kinds of input.

Usage: ``python benchmarks/bench_scale.py [--part all|throughput|memory] [--seeds 96]
[--steps 10] [--small 1000] [--large 10000]``. Writes nothing outside a temporary folder.
On a shared machine the absolute rates are low and noisy; the ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def env(threads: int) -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = str(threads)
    e["MKL_NUM_THREADS"] = str(threads)
    e["PYTHONPATH"] = str(HERE / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "latentgeo", *args]


def make_seeds(folder: Path, n: int, batch_file: bool) -> Path:
    """n standard-normal seeds of the bundled model's shape (1, 32, 32)."""
    import torch

    from latentgeo.io import save_latent

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    if batch_file:
        p = folder / "seeds.safetensors"
        save_latent(p, torch.randn((n, 1, 32, 32), generator=g))
        return p
    d = folder / "seeds"
    d.mkdir()
    for i in range(n):
        save_latent(d / f"s{i:05d}.safetensors", torch.randn((1, 32, 32), generator=g))
    return d


def loop_seconds(out: Path) -> float:
    """From the manifests: last ``end`` minus first ``start`` over every shard."""
    from latentgeo.jobs import read_manifest

    starts, ends = [], []
    for p in out.glob("manifest-*.jsonl"):
        for r in read_manifest(p):
            if r.get("event") == "start":
                starts.append(r["time"])
            elif r.get("event") == "end":
                ends.append(r["time"])
    return max(ends) - min(starts)


def run_case(name: str, seeds: Path, out: Path, steps: int, threads: int, procs: int,
             batch: int) -> tuple[float, float]:
    """(loop seconds, whole-command wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["render", str(seeds), "-o", str(out), "--steps", str(steps), "--batch-size",
            str(batch)]
    if procs == 1:
        cmd = cli(*args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", "29531", "-m", "latentgeo", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env(threads), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return loop_seconds(out), wall


def throughput(args: argparse.Namespace, tmp: Path) -> dict:
    seeds = make_seeds(tmp / "tp", args.seeds, batch_file=True)
    cases = [("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 2, 1),
             ("2 procs x 1 thread (torchrun)", 1, 2)]
    res = {}
    for name, threads, procs in cases:
        runs = [run_case(name, seeds, tmp / "tp-out", args.steps, threads, procs,
                         args.batch_size) for _ in range(args.repeats)]
        loop, wall = min(runs)
        res[name] = {"loop_s": loop, "wall_s": wall, "seeds_per_s": args.seeds / loop}
        print(f"  {name}: {args.seeds / loop:.2f} seeds/s (loop {loop:.1f} s, "
              f"command {wall:.1f} s)", flush=True)
    return res


def peak_rss_kb(cmd: list[str], e: dict[str, str]) -> tuple[int, float, float]:
    """(peak resident set of the child in KiB, wall seconds, CPU seconds), from wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}")
    return int(usage.ru_maxrss), time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def item_bytes(tmp: Path, n: int, batch_file: bool) -> tuple[float, int]:
    """Python memory a job holds per input (tracemalloc: deterministic, unlike a peak RSS):
    the input file names, the sorted items of ``n`` seeds, this shard's list and the plan;
    and the bytes of one-off blocks left out of it."""
    import tracemalloc

    from latentgeo import jobs
    from latentgeo.io import latent_file_names
    from latentgeo.launch import Shard

    seeds = make_seeds(tmp / f"ib-{n}-{batch_file}", n, batch_file=batch_file)
    tracemalloc.start()
    names = latent_file_names([str(seeds)])  # what the CLI holds for the whole run
    given, _ = jobs.seed_items(names, (1, 32, 32))
    mine = jobs.shard_items(jobs.sort_items(given), Shard())
    del given
    plan = jobs.plan(mine, lambda it: tmp / "none" / f"{it.key}.png", lambda it: None)
    traces = tracemalloc.take_snapshot().traces
    tracemalloc.stop()
    del plan, mine, names
    shutil.rmtree(seeds.parent, ignore_errors=True)
    # One block of >= 1 MiB is not per-input memory: it is the interpreter's table of
    # interned strings (pathlib interns every path part) growing once, to a size set by
    # the strings torch and the interpreter intern; it lands in whichever window fills it.
    one_off = sum(t.size for t in traces if t.size >= 1 << 20)
    return (sum(t.size for t in traces) - one_off) / n, one_off


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def memory(args: argparse.Namespace, tmp: Path) -> dict:
    res = {}
    for kind in args.kinds:
        per_item, one_off = item_bytes(tmp, args.large, batch_file=(kind == "batch file"))
        res[f"python_bytes_per_input ({kind})"] = per_item
        print(f"  Python memory held per input, {kind} (tracemalloc, {args.large} seeds): "
              f"{per_item:.0f} bytes" + (f" (plus a one-off {one_off / 2**20:.1f} MiB block: "
                                         "the interned-string table growing)" if one_off
                                         else ""), flush=True)
    for kind in args.kinds:
        row: dict = {}
        sizes = (args.small, args.large)
        seeds = {n: make_seeds(tmp / f"m-{kind[0]}-{n}", n, batch_file=(kind == "batch file"))
                 for n in sizes}
        runs: dict[int, list[tuple[int, float, float]]] = {n: [] for n in sizes}
        for r in range(args.mem_repeats):  # sizes interleaved: a cut-short run still pairs
            for n in sizes:
                out = tmp / f"m-out-{kind[0]}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                runs[n].append(peak_rss_kb(cli("render", str(seeds[n]), "-o", str(out),
                                               "--steps", str(args.mem_steps), "--batch-size",
                                               str(args.batch_size)), env(1)))
                rss, wall, cpu = runs[n][-1]
                print(f"  {kind}, {n} seeds, run {r + 1}: peak RSS {rss / 1024:.1f} MiB "
                      f"({wall:.0f} s wall, {cpu:.0f} s CPU; load average "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        for n in sizes:
            rss = median([x for x, _, _ in runs[n]])
            row[n] = {"peak_rss_kib": rss, "all_kib": [x for x, _, _ in runs[n]],
                      "wall_s": [w for _, w, _ in runs[n]], "cpu_s": [c for _, _, c in runs[n]]}
            print(f"  {kind}, {n} seeds: median peak RSS {rss / 1024:.1f} MiB (runs "
                  f"{', '.join(f'{x / 1024:.1f}' for x, _, _ in runs[n])} MiB)", flush=True)
            shutil.rmtree(seeds[n].parent, ignore_errors=True)
        growth = (row[args.large]["peak_rss_kib"] - row[args.small]["peak_rss_kib"]) * 1024 / (
            args.large - args.small)
        row["bytes_per_extra_seed"] = growth
        res[kind] = row
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "throughput", "memory"], default="all")
    p.add_argument("--seeds", type=int, default=96)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=10000)
    p.add_argument("--mem-steps", type=int, default=5, help="DDIM steps of the memory runs.")
    p.add_argument("--mem-repeats", type=int, default=3,
                   help="Runs per memory case; the median peak is used, every run printed.")
    p.add_argument("--kinds", nargs="+", default=["folder", "batch file"],
                   choices=["folder", "batch file"], help="Inputs of the memory runs.")
    p.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = p.parse_args()
    print(f"bench_scale: {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        tmp = Path(d)
        if args.part in ("all", "throughput"):
            print(f"throughput: render {args.seeds} seeds, {args.steps} steps", flush=True)
            out["throughput"] = throughput(args, tmp)
        if args.part in ("all", "memory"):
            print(f"memory: render --steps {args.mem_steps}, {args.small} vs {args.large} seeds",
                  flush=True)
            out["memory"] = memory(args, tmp)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "throughput" in out:
        t = out["throughput"]
        base = t["1 proc x 1 thread"]["seeds_per_s"]
        table = Table(title=f"Throughput, render {args.seeds} seeds x {args.steps} steps "
                      "(bundled model, CPU)")
        for c in ("case", "seeds/s", "x 1x1", "loop s", "command s"):
            table.add_column(c, justify="left" if c == "case" else "right")
        for name, r in t.items():
            table.add_row(name, f"{r['seeds_per_s']:.2f}", f"{r['seeds_per_s'] / base:.2f}",
                          f"{r['loop_s']:.1f}", f"{r['wall_s']:.1f}")
        console.print(table)
        two = t["2 procs x 1 thread (torchrun)"]["seeds_per_s"]
        thr = t["1 proc x 2 threads"]["seeds_per_s"]
        print(f"2 procs x 1 thread vs 1 x 1: {two / base:.2f}x (target >= 1.7x); "
              f"vs 1 proc x 2 threads: {two / thr:.2f}x")
    if "memory" in out:
        table = Table(title=f"Peak RSS of render --steps {args.mem_steps} (bundled model)")
        for c in ("input", f"{args.small} seeds MiB", f"{args.large} seeds MiB",
                  "bytes / extra seed"):
            table.add_column(c, justify="left" if c == "input" else "right")
        for kind, r in out["memory"].items():
            if kind.startswith("python_bytes_per_input"):
                continue
            table.add_row(kind, f"{r[args.small]['peak_rss_kib'] / 1024:.1f}",
                          f"{r[args.large]['peak_rss_kib'] / 1024:.1f}",
                          f"{r['bytes_per_extra_seed']:.0f}")
        console.print(table)
        print("target: < 1024 bytes per extra seed (one seed is 4096 bytes); median of "
              f"{args.mem_repeats} run(s) per size; glibc malloc at its defaults, no "
              "environment variable")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
