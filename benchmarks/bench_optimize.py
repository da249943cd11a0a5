"""Seed-optimisation cost on the bundled model: memory, time per iteration, a whole run.

Every setting runs in a fresh Python process (``--child``), so peak memory is that setting's:

* **memory**: batch 16, one iteration (render with gradients, judge A's log-probability, backward
  to the seeds) at K = 5 and K = 50 DDIM steps with per-step + decoder checkpointing (and at
  K = 50 without, for contrast). Reported: the increase of the process's peak resident memory
  (VmHWM) over its resident memory once the model and judges are loaded and warm, with glibc's
  default malloc and no environment variable (what a user gets), and the peak of the live
  tensor bytes from torch's allocation trace (``torch.profiler``, ``profile_memory``), which no
  allocator behaviour affects. Target: increase(K = 50) <= 1.5 x increase(K = 5). For
  contrast, the same with ``torch.utils.checkpoint(use_reentrant=False)`` (latentgeo's
  checkpointing before ``latentgeo.diffusion.recompute``: its per-step autograd nodes fragment
  glibc's heap), with the default malloc and with ``MALLOC_MMAP_THRESHOLD_=65536`` (a
  non-default environment variable, marked as such in the table).
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
import os
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
    if setting.get("impl") == "torch":  # the checkpointing latentgeo used before recompute()
        from torch.utils.checkpoint import checkpoint as torch_checkpoint

        import latentgeo.diffusion.render as render_module
        import latentgeo.diffusion.sampler as sampler_module

        def torch_recompute(fn, x):
            if torch.is_grad_enabled() and x.requires_grad:
                return torch_checkpoint(fn, x, use_reentrant=False)
            return fn(x)

        sampler_module.recompute = render_module.recompute = torch_recompute
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
        if setting.get("live"):
            return {**setting, "live_peak_mib": live_peak_bytes(
                lambda: iteration(setting["checkpoint"])) / 2**20}
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


def live_peak_bytes(fn) -> float:
    """Peak of the live tensor bytes while ``fn()`` runs: every allocation and free torch's
    profiler records (``profile_memory``), summed in time order. NaN where this torch's
    profiler does not expose its allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        from torch._C._profiler import _EventType

        sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation:
                sizes.append((e.start_time_ns, e.extra_fields.alloc_size))
            stack.extend(e.children)
    except (AttributeError, ImportError):
        return float("nan")
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return float(peak)


def run_child(setting: dict, env: dict | None = None) -> dict:
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
    for part, fn in (("memory", lambda: memory(console, t)),
                     ("time", lambda: timing(console, t, args.repeats)),
                     ("run", lambda: whole_run(console, t))):
        if args.only in (None, part):
            start = load_average()
            out[part] = fn()
            console.print(f"{part}: load average {start} at the start, {load_average()} at "
                          f"the end ({os.cpu_count()} CPUs, {t} thread(s))")
            out[f"{part}_load"] = [start, load_average()]
    print(json.dumps(out))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory(console, t: int) -> list[dict]:
    from rich.table import Table

    cases = [  # (checkpointing implementation, environment, label)
        ("latentgeo", {}, "recompute (default)"),
        ("torch", {}, "torch non-reentrant (before)"),
        ("torch", MALLOC_ENV, "torch non-reentrant + MALLOC_MMAP_THRESHOLD_=65536 "
                              "(non-default env)"),
    ]
    rows = []
    table = Table(title="memory: one iteration, batch 16 (fresh process each; glibc malloc "
                  "at its defaults unless the row says otherwise)")
    for c in ("checkpointing, malloc", "K", "ckpt", "loaded RSS MiB", "peak increase MiB",
              "vs K=5", "live tensor peak MiB"):
        table.add_column(c, justify="right")
    for impl, env, label in cases:
        settings = ((5, True), (50, True)) if impl == "torch" else (
            (5, True), (50, True), (50, False))
        mem = {}
        for kk, ck in settings:
            s = {"kind": "memory", "steps": kk, "checkpoint": ck, "threads": t, "impl": impl}
            mem[(kk, ck)] = run_child(s, env)
            if not env:
                mem[(kk, ck)]["live_peak_mib"] = run_child({**s, "live": True})[
                    "live_peak_mib"]
        ref = mem[(5, True)]["increase_mib"]
        for (kk, ck), m in mem.items():
            live = m.get("live_peak_mib")
            table.add_row(label, str(kk), "yes" if ck else "no", f"{m['baseline_mib']:.0f}",
                          f"{m['increase_mib']:.1f}", f"{m['increase_mib'] / ref:.2f}x",
                          "" if live is None else f"{live:.1f}")
            rows.append({**m, "label": label})
        rows.append({"label": label, "ratio_50_5": mem[(50, True)]["increase_mib"] / ref})
    console.print(table)
    for r in rows:
        if "ratio_50_5" in r:
            console.print(f"{r['label']}: K=50 / K=5 increase with checkpointing "
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
