"""Soft-token acceptance table: does the bundled model follow its class at guidance 1 with
tokens as well as at guidance 2 without them?

Trains the default tokens (``latentgeo align --model bundled -o FILE --loss L``, timed as the
user runs it) unless the files exist, then renders the same 100 seeds per class at 50 DDIM
steps for no tokens / SoftREPA / AGSM at guidance 1 and 2, and classifies them with judge B
(trained on the other half of the data from the bundled classifier, so not the judge any
training here saw). Realism: Fréchet distance and KID between judge-B features of the renders
and of the 500 held-out digits. Unconditional: the same 1,000 seeds rendered with the null
class. Every row is cached under --cache, so an interrupted run resumes.

Intervals (95%): Wilson for accuracies; the paired difference of accuracies on the same seeds
as mean +/- 1.96 sd / sqrt(n); a grouped jackknife over the renders (50 groups, the real set
held fixed) for FD and KID, percentile bootstrap for the mean confidence. KID uses judge-B
features as they are (not Inception's), so its scale is this table's own.

    OMP_NUM_THREADS=1 python benchmarks/align_table.py            # writes docs/results/align.md
    python benchmarks/align_table.py --per-class 5 --steps 10 --out /tmp/a.md   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentgeo.align import attach, load_tokens
from latentgeo.classifier import load_judge
from latentgeo.data import load_mnist_split
from latentgeo.diffusion import load_model, render
from latentgeo.evaluation import frechet_distance, kernel_inception_distance, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("none", "softrepa", "agsm")
#: Measurement order: what the hypothesis needs first, then the rest.
ROWS = ("none-g2", "none-g1", "softrepa-g1", "agsm-g1", "none-uncond", "softrepa-uncond",
        "agsm-uncond", "softrepa-g2", "agsm-g2")
SEED = 2026


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train(loss: str, path: Path, steps: int | None) -> dict:
    """Run the default ``latentgeo align`` for ``loss`` as a subprocess; wall time and load."""
    cmd = [sys.executable, "-c", "from latentgeo.cli import main; main()", "align", "--model",
           "bundled", "-o", str(path), "--loss", loss, "--json", "--force"]
    if steps is not None:
        cmd += ["--max-iters", str(steps)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    summary = json.loads(out.stdout)
    return {"loss": loss, "wall_s": wall, "cpu_s": cpu, "loop_s": summary["seconds"],
            "steps": summary["steps"], "load_start": load0, "load_end": os.getloadavg()[0],
            "threads": os.environ.get("OMP_NUM_THREADS", "all"), "cpus": os.cpu_count(),
            "final_loss": summary["final_loss"]}


@torch.no_grad()
def judge_all(judge, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probs, feats = [], []
    for chunk in images.split(250):
        f = judge.features(chunk)
        probs.append(torch.softmax(judge.head(f), dim=1))
        feats.append(f)
    p = torch.cat(probs).numpy()
    return p.argmax(1), p.max(1), torch.cat(feats).numpy().astype(np.float64)


def row(backend, judge, seeds, labels, guidance, steps, cache: Path) -> dict:
    """Render, judge and cache one (tokens, guidance) row."""
    if cache.with_suffix(".npz").exists():
        z = np.load(cache.with_suffix(".npz"))
        return {k: z[k] for k in z.files}
    t0 = time.perf_counter()
    cond = None if labels is None else labels.tolist()
    images = render(backend, seeds, cond, steps=steps, guidance=guidance, batch_size=100)
    secs = time.perf_counter() - t0
    pred, conf, feats = judge_all(judge, images)
    out = {"pred": pred, "conf": conf, "feats": feats, "seconds": np.array(secs),
           "images": images.numpy()}
    np.savez(cache.with_suffix(".npz"), **out)
    return out


def realism(feats: np.ndarray, real: np.ndarray, groups: int = 50) -> dict:
    """FD and KID of render features against the real ones, each with a 95% interval from the
    grouped (delete-a-group) jackknife over the renders, the real set held fixed: with
    G groups and leave-one-group-out values t_g, se^2 = (G - 1) / G * sum (t_g - mean t)^2
    (Efron & Stein 1981). The bootstrap is no use here: resampling with replacement duplicates
    rows, which shifts FD and KID by far more than their spread."""
    fd, kid = frechet_distance(feats, real), kernel_inception_distance(feats, real)
    blocks = np.array_split(np.arange(len(feats)), groups)
    fds, kids = [], []
    for blk in blocks:
        keep = np.setdiff1d(np.arange(len(feats)), blk)
        fds.append(frechet_distance(feats[keep], real))
        kids.append(kernel_inception_distance(feats[keep], real))
    out = {"fd": fd, "kid": kid}
    for name, est, vals in (("fd", fd, fds), ("kid", kid, kids)):
        v = np.asarray(vals)
        se = float(np.sqrt((groups - 1) / groups * ((v - v.mean()) ** 2).sum()))
        out[f"{name}_ci"] = [est - 1.96 * se, est + 1.96 * se]
    return out


def mean_ci(x: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    boots = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


def paired_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean of a - b (0/1 hits on the same seeds) and its normal 95% interval, in points."""
    d = a.astype(np.float64) - b.astype(np.float64)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return 100 * d.mean(), 100 * (d.mean() - half), 100 * (d.mean() + half)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--token-per-class", type=int, default=None,
                    help="render token rows on the first K seeds of every class only "
                         "(a nested subset of the no-token rows; default: all)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=None,
                    help="override the CLI default (smoke runs only)")
    ap.add_argument("--tokens-dir", type=Path, default=ROOT / "docs" / "results" / "align")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "align")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "align.md")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help="rows to measure, in this order (cached rows are skipped)")
    ap.add_argument("--measure-only", action="store_true",
                    help="fill the cache, write no report")
    ap.add_argument("--train", default="softrepa,agsm",
                    help="losses whose default tokens to train when missing ('' = none)")
    ap.add_argument("--boot", type=int, default=200)
    args = ap.parse_args(argv)
    args.tokens_dir.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    tag = f"p{args.per_class}-s{args.steps}"

    timings_path = args.tokens_dir / "training.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for loss in [x for x in args.train.split(",") if x]:
        path = args.tokens_dir / f"{loss}.safetensors"
        if not path.exists():
            log(f"training {loss} tokens (latentgeo align --model bundled --loss {loss})")
            timings[loss] = train(loss, path, args.train_steps)
            timings_path.write_text(json.dumps(timings, indent=2))
            log(f"  {timings[loss]['wall_s']:.0f} s")

    backend = load_model("bundled")
    judge = load_judge("b").eval()
    split = load_mnist_split()
    real = judge_all(judge, split.heldout_images)[2]
    n = 10 * args.per_class
    seeds = torch.randn((n, *backend.latent_shape), generator=torch.Generator().manual_seed(SEED))
    labels = torch.arange(10).repeat_interleave(args.per_class)
    k = args.per_class if args.token_per_class is None else min(args.token_per_class,
                                                                 args.per_class)
    #: token rows: the first k seeds of every class block (nested in the no-token rows)
    sub = (torch.arange(10)[:, None] * args.per_class + torch.arange(k)[None]).reshape(-1)

    def token_file(cfg: str) -> Path:
        return args.tokens_dir / f"{cfg}.safetensors"

    def cached(cfg: str, g: object) -> Path:
        if cfg != "none" and g != "uncond" and k != args.per_class:
            return args.cache / f"{tag}-k{k}-{cfg}-g{g:g}"
        return args.cache / (f"{tag}-{cfg}-g{g:g}" if g != "uncond" else f"{tag}-{cfg}-uncond")

    def measure(key: str) -> None:
        cfg, kind = key.rsplit("-", 1)
        attach(backend, None if cfg == "none" else load_tokens(token_file(cfg)), cfg)
        if kind in ("g1", "g2"):
            g = float(kind[1:])
            idx = sub if cfg != "none" else torch.arange(n)
            log(f"{cfg} guidance {g:g}: rendering {len(idx)} digits, {args.steps} steps")
            row(backend, judge, seeds[idx], labels[idx], g, args.steps, cached(cfg, g))
            return
        log(f"{cfg}: unconditional")
        if cfg == "none":
            row(backend, judge, seeds, None, 1.0, args.steps, cached(cfg, "uncond"))
            return
        # Tokens whose null-class row is untouched render the unconditional model bit for bit
        # as before: check that on the first 100 seeds (against the no-token row), and render
        # all of them only if it differs.
        base_path = cached("none", "uncond").with_suffix(".npz")
        if not base_path.exists():
            measure("none-uncond")
            attach(backend, load_tokens(token_file(cfg)), cfg)
        base = dict(np.load(base_path))
        head = render(backend, seeds[:100], None, steps=args.steps, batch_size=100).numpy()
        same = np.array_equal(head, base["images"][:100])
        flag = cached(cfg, "uncond").with_name(cached(cfg, "uncond").name + ".identical")
        if same:
            flag.write_text("bit-identical to none-uncond on the first 100 seeds\n")
        else:
            row(backend, judge, seeds, None, 1.0, args.steps, cached(cfg, "uncond"))

    for key in args.rows.split(","):
        if key:
            measure(key)
    if args.measure_only:
        return

    results: dict[tuple[str, object], dict] = {}
    for cfg in CONFIGS:
        for g in (1.0, 2.0, "uncond"):
            path = cached(cfg, g).with_suffix(".npz")
            flag = cached(cfg, g).with_name(cached(cfg, g).name + ".identical")
            if path.exists():
                results[(cfg, g)] = dict(np.load(path))
            elif g == "uncond" and flag.exists() and ("none", "uncond") in results:
                results[(cfg, g)] = {**results[("none", "uncond")], "identical": True}
    y = labels.numpy()
    sub_np = sub.numpy()

    subset_note = ("" if k == args.per_class else
                   f" Token rows use the first {k} seeds of every class (a nested subset of "
                   f"the no-token rows, {10 * k} renders); FD and KID of every row are "
                   f"computed on that common subset, and the paired differences below too.")
    lines = ["# Soft tokens on the bundled model", "",
             f"{args.per_class} seeds per class ({n} seeds, the same in every row), "
             f"{args.steps} DDIM steps; judge B classifies (conditional accuracy, 95% Wilson "
             "interval; mean top-class confidence); FD and KID between judge-B features of the "
             "renders and of the 500 held-out digits (95% intervals from a grouped "
             "jackknife over the renders, 50 groups, the real digits held fixed; KID on "
             "judge-B features, so its scale is this table's). NFE = network evaluations per "
             "step." + subset_note, "",
             "| tokens | guidance | NFE/step | n | accuracy % [95%] | confidence | FD [95%] | "
             "KID [95%] | render s |", "|---|---|---|---|---|---|---|---|---|"]
    summary: dict = {}
    for cfg in CONFIGS:
        for g in (1.0, 2.0):
            if (cfg, g) not in results:
                lines.append(f"| {cfg} | {g:g} | {1 if g == 1 else 2} | | not measured (time) "
                             "| | | | |")
                continue
            r = results[(cfg, g)]
            rows_y = y if len(r["pred"]) == n else y[sub_np]
            hits = r["pred"] == rows_y
            lo, hi = wilson_interval(int(hits.sum()), len(hits))
            feats = r["feats"][sub_np] if len(r["feats"]) == n and k != args.per_class \
                else r["feats"]
            real_stats = realism(feats, real)
            conf = mean_ci(r["conf"], args.boot, 1)
            summary[f"{cfg}-g{g:g}"] = {"accuracy": float(hits.mean()), "ci": [lo, hi],
                                         "confidence": conf, **real_stats}
            lines.append(
                f"| {cfg} | {g:g} | {1 if g == 1 else 2} | {len(hits)} | {100 * hits.mean():.1f} "
                f"[{100 * lo:.1f}, {100 * hi:.1f}] | {conf[0]:.3f} | {real_stats['fd']:.2f} "
                f"[{real_stats['fd_ci'][0]:.2f}, {real_stats['fd_ci'][1]:.2f}] | "
                f"{real_stats['kid']:.3g} [{real_stats['kid_ci'][0]:.3g}, "
                f"{real_stats['kid_ci'][1]:.3g}] | {float(r['seconds']):.0f} |")
    lines += ["", "## Unconditional samples (null class, guidance 1)", "",
              "| tokens | confidence [95%] | FD [95%] | KID [95%] | bit-identical to no "
              "tokens (first 100 seeds checked) |", "|---|---|---|---|---|"]
    for cfg in CONFIGS:
        if (cfg, "uncond") not in results:
            lines.append(f"| {cfg} | not measured (time) | | | |")
            continue
        r = results[(cfg, "uncond")]
        conf = mean_ci(r["conf"], args.boot, 2)
        rs = realism(r["feats"], real)
        same = bool(r.get("identical", cfg == "none"))
        summary[f"{cfg}-uncond"] = {"confidence": conf, **rs, "identical": same}
        lines.append(f"| {cfg} | {conf[0]:.3f} [{conf[1]:.3f}, {conf[2]:.3f}] | {rs['fd']:.2f} "
                     f"[{rs['fd_ci'][0]:.2f}, {rs['fd_ci'][1]:.2f}] | {rs['kid']:.3g} "
                     f"[{rs['kid_ci'][0]:.3g}, {rs['kid_ci'][1]:.3g}] | "
                     f"{'yes' if same else 'no'} |")
    lines += ["", "## Hypothesis: tokens at guidance 1 match no tokens at guidance 2", "",
              "Paired on the same seeds: accuracy(tokens, g = 1) - accuracy(none, g = 2), "
              f"points, 95% interval, n = {len(sub_np)}; the target is a lower bound >= -1 "
              "point at half the network evaluations.", "",
              "| tokens | difference [95%] | target met | vs none at g = 1 [95%] |",
              "|---|---|---|---|"]
    for cfg in ("softrepa", "agsm"):
        if not {(cfg, 1.0), ("none", 1.0), ("none", 2.0)} <= set(results):
            lines.append(f"| {cfg} | not measured (time) | | |")
            continue
        ref2 = (results[("none", 2.0)]["pred"] == y)[sub_np]
        ref1 = (results[("none", 1.0)]["pred"] == y)[sub_np]
        hits = results[(cfg, 1.0)]["pred"] == y[sub_np]
        d, lo, hi = paired_diff(hits, ref2)
        d1, lo1, hi1 = paired_diff(hits, ref1)
        summary[f"{cfg}-vs-none-g2"] = [d, lo, hi]
        summary[f"{cfg}-vs-none-g1"] = [d1, lo1, hi1]
        lines.append(f"| {cfg} | {d:+.1f} [{lo:+.1f}, {hi:+.1f}] | "
                     f"{'yes' if lo >= -1.0 else 'no'} | {d1:+.1f} [{lo1:+.1f}, {hi1:+.1f}] |")
    if timings:
        lines += ["", "## Training time (default `latentgeo align --model bundled`)", "",
                  f"This CPU: {os.cpu_count()} cores, shared with other jobs while these ran "
                  "(load average at start / end below; a quiet machine is faster).", "",
                  "| loss | iterations | wall s (command) | CPU s (command) | loop wall s | "
                  "load avg start / end | OMP threads |", "|---|---|---|---|---|---|---|"]
        for loss, t in timings.items():
            cpu = f"{t['cpu_s']:.0f}" if "cpu_s" in t else "n/a"
            lines.append(f"| {loss} | {t['steps']} | {t['wall_s']:.0f} | {cpu} | "
                         f"{t['loop_s']:.0f} | {t['load_start']:.1f} / {t['load_end']:.1f} | "
                         f"{t['threads']} |")
        lines += ["", "CPU s is the command's own processor time (user + system): on a quiet "
                  "machine with one thread the wall time is close to it; the wall times above "
                  "include waiting for the other jobs."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps(
        {"summary": summary, "training": timings}, indent=2, default=float))
    print(text)


if __name__ == "__main__":
    main()
