"""Seed-optimisation cost on the bundled model: memory, time per iteration, a whole run.

Every setting runs in a fresh Python process (``--child``), so peak memory is that setting's:

* **memory**: batch 16, one iteration (render with gradients, judge A's log-probability, backward
  to the seeds) at K = 5 and K = 50 DDIM steps with per-step + decoder checkpointing (and at
  K = 50 without, for contrast). Reported: the increase of the process's peak resident memory
  (VmHWM) over its resident memory once the model and judges are loaded and warm. Target:
  increase(K = 50) <= 1.5 x increase(K = 5). Each is measured twice: with glibc's default
  malloc, whose dynamic mmap threshold keeps freed step buffers in the heap (RSS then grows
  with K although the live tensors do not), and with ``MALLOC_MMAP_THRESHOLD_=65536`` (large
  buffers are returned to the OS when freed), which shows the live memory.
* **time**: batch 16, K = 1, 4, 10, 50: a no-grad render of K steps vs one optimisation
  iteration of K steps (checkpointed); iterations per second. Target: iteration <= 3.5 x render.
* **run**: ``optimize`` of 8 bundled seeds, 10 steps, 30 iterations (``reno`` preset, class:c
  per seed). Target: under 2 minutes.

Network weights are frozen (gradients flow to the seeds only). Times are best of ``--repeats``
wall seconds, with the CPU seconds of that run: on a shared, loaded machine the wall time
includes waiting for a core, the CPU time does not. One thread (``torch.set_num_threads(1)``)
unless ``--threads``.

    python benchmarks/bench_optimize.py [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def best_of(fn, repeats: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - start, time.process_time() - cpu))
    return min(runs)


def child(setting: dict) -> dict:
    import torch

    from latentgeo.diffusion import load_model, render
    from latentgeo.diffusion.render import render_grad
    from latentgeo.optimize import optimize, resolve
    from latentgeo.optimize.rewards import class_reward_per_seed
    from latentgeo.sampling import sample_seeds

    torch.set_num_threads(setting["threads"])
    backend = load_model("bundled")
    reward = class_reward_per_seed()
    n, k = setting.get("batch", 16), setting.get("steps", 10)
    z = sample_seeds(n, backend.latent_shape, seed=0)
    labels = [i % 10 for i in range(n)]

    def iteration(checkpoint: bool = True) -> None:
        x = z.clone().requires_grad_(True)
        images, _ = render_grad(backend, x, steps=k, checkpoint=checkpoint)
        reward(images, labels).sum().backward()
        assert torch.isfinite(x.grad).all()

    if setting["kind"] == "memory":
        with torch.no_grad():  # warm the kernels and the judges at a tiny size
            reward(render(backend, z[:1], steps=1), labels[:1])
        base = _status_kib("VmRSS")
        iteration(setting["checkpoint"])
        return {**setting, "baseline_mib": base / 1024,
                "increase_mib": (_status_kib("VmHWM") - base) / 1024}
    if setting["kind"] == "time":
        render(backend, z[:2], steps=1)  # warm-up
        r_wall, r_cpu = best_of(lambda: render(backend, z, steps=k, batch_size=n),
                                setting["repeats"])
        i_wall, i_cpu = best_of(iteration, setting["repeats"])
        return {**setting, "render_s": r_wall, "render_cpu_s": r_cpu, "iter_s": i_wall,
                "iter_cpu_s": i_cpu}
    # a whole run
    start, cpu = time.perf_counter(), time.process_time()
    res = optimize(backend, z, [reward], steps=k, settings=resolve("reno", iters=30),
                   reward_condition=labels)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {**setting, "wall_s": wall, "cpu_s": cpu,
            "target_before": sum(lg[0]["target"] for lg in res.log) / n,
            "target_best": sum(res.best(i)["target"] for i in range(n)) / n}


def run_child(setting: dict, env: dict | None = None) -> dict:
    import os

    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(setting)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"setting {setting} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=("memory", "time", "run"), default=None,
                    help="run one part only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    from rich.console import Console

    console = Console()
    t = args.threads
    out: dict = {}
    if args.only in (None, "memory"):
        out["memory"] = memory(console, t)
    if args.only in (None, "time"):
        out["time"] = timing(console, t, args.repeats)
    if args.only in (None, "run"):
        out["run"] = whole_run(console, t)
    print(json.dumps(out))


MALLOC = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {
    "MALLOC_MMAP_THRESHOLD_": "65536"}}


def memory(console, t: int) -> list[dict]:
    from rich.table import Table

    rows = []
    table = Table(title="memory: one iteration, batch 16 (fresh process each)")
    for c in ("malloc", "K", "checkpointing", "loaded RSS MiB", "peak increase MiB",
              "vs K=5 ckpt"):
        table.add_column(c, justify="right")
    for label, env in MALLOC.items():
        mem = {(kk, ck): run_child({"kind": "memory", "steps": kk, "checkpoint": ck,
                                    "threads": t}, env)
               for kk, ck in ((5, True), (50, True), (50, False))}
        ref = mem[(5, True)]["increase_mib"]
        for (kk, ck), m in mem.items():
            table.add_row(label, str(kk), "yes" if ck else "no", f"{m['baseline_mib']:.0f}",
                          f"{m['increase_mib']:.1f}", f"{m['increase_mib'] / ref:.2f}x")
            rows.append({**m, "malloc": label})
        ratio = mem[(50, True)]["increase_mib"] / ref
        rows.append({"malloc": label, "ratio_50_5": ratio})
    console.print(table)
    for r in rows:
        if "ratio_50_5" in r:
            console.print(f"{r['malloc']}: K=50 / K=5 increase with checkpointing "
                          f"{r['ratio_50_5']:.2f}x ({'PASS' if r['ratio_50_5'] <= 1.5 else 'FAIL'}"
                          " <= 1.5x)")
    return rows


def timing(console, t: int, repeats: int) -> list[dict]:
    from rich.table import Table

    times = [run_child({"kind": "time", "steps": kk, "threads": t, "repeats": repeats})
             for kk in (1, 4, 10, 50)]
    table = Table(title=f"time: batch 16, best of {repeats} (wall s / CPU s)")
    for c in ("K", "no-grad render", "iteration", "iter / render (wall)", "iter / render (CPU)",
              "it/s"):
        table.add_column(c, justify="right")
    for r in times:
        table.add_row(str(r["steps"]), f"{r['render_s']:.2f} / {r['render_cpu_s']:.2f}",
                      f"{r['iter_s']:.2f} / {r['iter_cpu_s']:.2f}",
                      f"{r['iter_s'] / r['render_s']:.2f}x",
                      f"{r['iter_cpu_s'] / r['render_cpu_s']:.2f}x", f"{1 / r['iter_s']:.3f}")
    console.print(table)
    worst = max(r["iter_cpu_s"] / r["render_cpu_s"] for r in times)
    console.print(f"worst iteration / render (CPU time): {worst:.2f}x "
                  f"({'PASS' if worst <= 3.5 else 'FAIL'} <= 3.5x)")
    return times


def whole_run(console, t: int) -> dict:
    run = run_child({"kind": "run", "batch": 8, "steps": 10, "threads": t})
    console.print(f"optimize 8 seeds, 10 steps, 30 iterations: {run['wall_s']:.1f} s wall "
                  f"({'PASS' if run['wall_s'] < 120 else 'FAIL'} < 120 s), {run['cpu_s']:.1f} s "
                  f"CPU ({'PASS' if run['cpu_s'] < 120 else 'FAIL'} < 120 s); mean class:c "
                  f"log p {run['target_before']:.2f} -> {run['target_best']:.2f}")
    return run


if __name__ == "__main__":
    main()
