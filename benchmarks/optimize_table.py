"""The Gaussianity paper's reward-hacking experiment in miniature (issue 13), on a CPU.

    python benchmarks/optimize_table.py           # full protocol, writes docs/results/optimize.md
    python benchmarks/optimize_table.py --quick   # smoke run (seconds; the test suite runs it)

Protocol (fixed seed): the bundled model, unconditional (null class), 10 DDIM steps; the same
50 random seeds, 5 per target class c = 0..9; target reward ``class:c`` (judge A's log p(c));
the ``reno`` optimiser for every row (SGD Nesterov 0.9, lr 5, per-seed clip 0.1, 50 iterations,
best iterate by the optimised objective); each regulariser's gradient rescaled to the reward
gradient's norm times lambda in {0.1, 1} (``none`` once). Columns: target success (judge A's
argmax = c), held-out success and mean log p(c) under judge B (never optimised), realism (KID
and FD of judge B's penultimate features of the 50 renders against the 500 real held-out
digits, pooled over classes), the ``stats`` pass rate of the optimised seeds, |z' - z| / |z|,
seconds per iteration (whole batch of 50, one thread). Proportions carry Wilson 95% intervals,
means percentile-bootstrap 95% intervals (1,000 resamples of the 50 seeds), n = 50 per row.

Each row is cached under ``--work`` as soon as it finishes (a rerun resumes; delete the folder to
start over); gradient checkpointing is off here (it only saves memory, the numbers are the
same; ``benchmarks/bench_optimize.py`` measures it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from latentgeo.classifier import load_judge
from latentgeo.data import load_mnist_split
from latentgeo.diffusion import load_model, render
from latentgeo.evaluation import bootstrap_interval, frechet_distance, wilson_interval
from latentgeo.gaussianity import gaussianity_stats_batch
from latentgeo.optimize import optimize, resolve
from latentgeo.optimize.rewards import class_reward_per_seed

ROOT = Path(__file__).resolve().parent.parent
#: Regularisers in the order the rows run (a partial run still has whole lambda pairs).
REGS = ("norm", "mpgr", "moment+spectral", "dno", "kl", "kurtosis", "moment", "spectral",
        "covariance")


@dataclass(frozen=True)
class Protocol:
    per_class: int
    classes: int
    steps: int
    iters: int
    lams: tuple[float, ...]
    regs: tuple[str, ...]
    seed: int = 0
    n_boot: int = 1000


FULL = Protocol(per_class=5, classes=10, steps=10, iters=50, lams=(0.1, 1.0), regs=REGS)
QUICK = Protocol(per_class=1, classes=3, steps=2, iters=2, lams=(1.0,), regs=("mpgr",),
                 n_boot=50)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rows_of(p: Protocol) -> list[tuple[str, float]]:
    return [("none", 0.0)] + [(r, lam) for r in p.regs for lam in p.lams]


def row_key(reg: str, lam: float) -> str:
    return f"{reg.replace('+', '_')}_{lam:g}"


def kid(gen: np.ndarray, real: np.ndarray) -> float:
    """Kernel inception distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic
    polynomial kernel k(x, y) = (x.y / dim + 1)^3."""
    dim = gen.shape[1]
    k_gg = (gen @ gen.T / dim + 1) ** 3
    k_rr = (real @ real.T / dim + 1) ** 3
    k_gr = (gen @ real.T / dim + 1) ** 3
    m, n = len(gen), len(real)
    return float((k_gg.sum() - np.trace(k_gg)) / (m * (m - 1))
                 + (k_rr.sum() - np.trace(k_rr)) / (n * (n - 1)) - 2 * k_gr.mean())


class Judges:
    def __init__(self) -> None:
        self.a, self.b = load_judge("a"), load_judge("b")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: np.ndarray) -> dict:
        la, lb = self.a.log_prob(images), self.b.log_prob(images)
        idx = torch.from_numpy(labels).long().unsqueeze(1)
        return {"a_hit": (la.argmax(1).numpy() == labels).tolist(),
                "b_hit": (lb.argmax(1).numpy() == labels).tolist(),
                "a_logp": la.gather(1, idx).squeeze(1).tolist(),
                "b_logp": lb.gather(1, idx).squeeze(1).tolist(),
                "features": self.b.features(images).numpy()}


def evaluate(backend, judges: Judges, z: torch.Tensor, z0: torch.Tensor, labels: np.ndarray,
             steps: int) -> dict:
    images = render(backend, z, steps=steps, batch_size=64)
    out = judges(images, labels)
    out["stats_pass"] = [r.passed for r in gaussianity_stats_batch(z)]
    out["rel_dist"] = ((z - z0).flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)).tolist()
    out["images"] = images
    return out


def run_row(backend, judges, seeds, labels, p: Protocol, reg: str, lam: float) -> dict:
    settings = resolve("reno", iters=p.iters, reg=reg, reg_weight=lam, rescale=reg != "none")
    t0 = time.perf_counter()
    res = optimize(backend, seeds, [class_reward_per_seed()], steps=p.steps, settings=settings,
                   reward_condition=labels.tolist(), checkpoint=False, reg_seed=p.seed)
    wall = time.perf_counter() - t0
    ev = evaluate(backend, judges, res.seeds, seeds, labels, p.steps)
    iters = len(res.log[0])
    secs = [res.log[0][t]["seconds"] for t in range(1, iters)] or [res.log[0][0]["seconds"]]
    curve_t = [float(np.mean([lg[t]["target"] for lg in res.log if len(lg) > t]))
               for t in range(iters)]
    curve_h = [float(np.mean([lg[t]["heldout"] for lg in res.log if len(lg) > t]))
               for t in range(iters)]
    return {"reg": reg, "lam": lam, "n": len(labels), "wall_s": wall,
            "seconds_per_iter": float(np.mean(secs)), "status": res.status,
            "best_iteration": res.best_iteration, "curve_target": curve_t,
            "curve_heldout": curve_h, "seeds": res.seeds, **ev}


def save_row(work: Path, key: str, row: dict) -> None:
    feats, images, seeds = row.pop("features"), row.pop("images"), row.pop("seeds")
    np.save(work / f"{key}.features.npy", feats)
    torch.save({"images": images, "seeds": seeds}, work / f"{key}.pt")
    tmp = work / f"{key}.json.tmp"
    tmp.write_text(json.dumps(row))
    os.replace(tmp, work / f"{key}.json")  # the row counts as done only once this exists
    row.update(features=feats, images=images, seeds=seeds)


def load_row(work: Path, key: str) -> dict | None:
    path = work / f"{key}.json"
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    row["features"] = np.load(work / f"{key}.features.npy")
    blob = torch.load(work / f"{key}.pt")
    row.update(images=blob["images"], seeds=blob["seeds"])
    return row


def summarise(row: dict, real: np.ndarray, n_boot: int) -> dict:
    n = row["n"]

    def prop(hits):
        k = int(sum(hits))
        return [k / n, *wilson_interval(k, n)]

    def mean(values):
        v = np.asarray(values, dtype=np.float64)
        return [float(v.mean()), *bootstrap_interval(v, n_boot=n_boot)]

    feats = row["features"]
    kid_boot = [kid(feats[i], real) for i in
                np.random.default_rng(0).integers(0, n, size=(min(n_boot, 200), n))]
    return {"reg": row["reg"], "lam": row["lam"], "n": n,
            "target_success": prop(row["a_hit"]), "heldout_success": prop(row["b_hit"]),
            "target_logp": mean(row["a_logp"]), "heldout_logp": mean(row["b_logp"]),
            "kid": [kid(feats, real), *np.quantile(kid_boot, [0.025, 0.975]).tolist()],
            "fd": frechet_distance(feats, real), "stats_pass": prop(row["stats_pass"]),
            "rel_dist": mean(row["rel_dist"]), "seconds_per_iter": row.get("seconds_per_iter"),
            "stopped_early": sum(s != "done" for s in row.get("status", []))}


def pick(summaries: list[dict], goal: float = 0.9) -> tuple[list[dict], dict | None]:
    """Per regulariser the lambda whose target success is nearest ``goal`` (ties: the smaller
    lambda); the winner has the best held-out success there (ties: held-out log p)."""
    chosen = []
    for reg in dict.fromkeys(s["reg"] for s in summaries if s["reg"] != "none"):
        cands = [s for s in summaries if s["reg"] == reg]
        chosen.append(min(cands, key=lambda s: (abs(s["target_success"][0] - goal), s["lam"])))
    if not chosen:
        return chosen, None
    return chosen, max(chosen, key=lambda s: (s["heldout_success"][0], s["heldout_logp"][0]))


def fmt_ci(v: list[float], pct: bool = False, digits: int = 2) -> str:
    if pct:
        return f"{100 * v[0]:.0f}% [{100 * v[1]:.0f}, {100 * v[2]:.0f}]"
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def write_report(out: Path, p: Protocol, base: dict, summaries: list[dict], rows: list[dict],
                 quick: bool, missing: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(out / "optimize_hacking.png", rows, p)
    plot_samples(out / "optimize_samples.png", rows)
    chosen, best = pick(summaries)
    head = ("| regulariser | lambda | target success | held-out success | held-out log p(c) | "
            "KID | FD | stats pass | \\|z'-z\\|/\\|z\\| | s/iter (50 seeds) |")
    lines = [head, "|" + "---|" * 10]

    def line(s: dict, name: str, lam: str) -> str:
        k = s["kid"]
        spi = "-" if s.get("seconds_per_iter") is None else f"{s['seconds_per_iter']:.2f}"
        return (f"| {name} | {lam} | {fmt_ci(s['target_success'], True)} | "
                f"{fmt_ci(s['heldout_success'], True)} | {fmt_ci(s['heldout_logp'])} | "
                f"{fmt_ci(k)} | {s['fd']:.1f} | {fmt_ci(s['stats_pass'], True)} | "
                f"{fmt_ci(s['rel_dist'], digits=3)} | {spi} |")

    lines.append(line(base, "(not optimised)", "-"))
    for s in summaries:
        lines.append(line(s, s["reg"], "-" if s["reg"] == "none" else f"{s['lam']:g}"))
    verdict = []
    if best is not None:
        verdict.append(
            f"At each regulariser's lambda whose target success is nearest 90%, the best "
            f"held-out success is **{best['reg']}** (lambda {best['lam']:g}: held-out "
            f"{fmt_ci(best['heldout_success'], True)}, target "
            f"{fmt_ci(best['target_success'], True)}).")
        mp = next((s for s in chosen if s["reg"] == "mpgr"), None)
        if mp is not None and mp is not best:
            verdict.append(
                f"The paper's regulariser does not win here: mpgr at lambda {mp['lam']:g} "
                f"reaches held-out {fmt_ci(mp['heldout_success'], True)}.")
        elif mp is best:
            verdict.append("The paper's regulariser (mpgr) wins here.")
        overlap = [s["reg"] for s in chosen if s is not best
                   and s["heldout_success"][2] >= best["heldout_success"][1]]
        if overlap:
            verdict.append(f"Its 95% interval overlaps those of {', '.join(overlap)}: with "
                           f"n = {best['n']} the ranking among them is not significant.")
    none = next((s for s in summaries if s["reg"] == "none"), None)
    text = [
        "# Seed optimisation: reward hacking in miniature"
        + (" (QUICK smoke run)" if quick else ""),
        "",
        f"`python benchmarks/optimize_table.py{' --quick' if quick else ''}` regenerates this "
        "page (seed fixed). Protocol: the bundled model, unconditional (null class), "
        f"{p.steps} DDIM steps; {p.per_class * p.classes} random seeds (seed {p.seed}), "
        f"{p.per_class} per target class c = 0..{p.classes - 1}; target reward `class:c` "
        "(judge A's log p(c)); the `reno` optimiser for every row (SGD Nesterov 0.9, lr 5, "
        f"per-seed gradient-norm clip 0.1, {p.iters} iterations, the best iterate by the "
        "optimised objective); each regulariser's gradient rescaled to the reward gradient's "
        f"norm times lambda in {{{', '.join(f'{x:g}' for x in p.lams)}}}.",
        "",
        "Columns: *target success* judge A's argmax = c; *held-out* judge B (another "
        "architecture and seed, trained on half the digits, never seen by the loop); "
        "*KID/FD* of judge B's penultimate features of the renders against the 500 real "
        "held-out digits, pooled over classes (per-class FD from 5 samples is degenerate; KID "
        "is unbiased at small n, FD from 50 samples in 96 dimensions is biased upwards and "
        "only comparable within this table); *stats pass* the share of optimised seeds that "
        "pass `latentgeo stats` (alpha 0.01); *s/iter* wall seconds of one iteration for the "
        "batch of 50 seeds on one CPU thread of a shared, loaded machine (timings are "
        "indicative only). Intervals: Wilson 95% for shares, percentile bootstrap 95% "
        f"otherwise; n = {p.per_class * p.classes} seeds per row.",
        "",
        *lines,
        "",
        "## Verdict",
        "",
        *(verdict or ["(no regularised row finished)"]),
        "",
    ]
    if none is not None:
        text += [f"Without a regulariser the target success is "
                 f"{fmt_ci(none['target_success'], True)} and the held-out success "
                 f"{fmt_ci(none['heldout_success'], True)} (not optimised: "
                 f"{fmt_ci(base['target_success'], True)} / "
                 f"{fmt_ci(base['heldout_success'], True)}).", ""]
    if missing:
        text += [f"**Incomplete run**: rows not measured: {', '.join(missing)}.", ""]
    text += [
        "## Hacking curve",
        "",
        "![target vs held-out](optimize_hacking.png)",
        "",
        "Mean over the seeds of the target log p(c) (judge A, solid) and the held-out log p(c) "
        "(judge B, dashed) at every iteration; the gap between them is what the optimiser "
        "gains on the judge it sees and not on the one it does not.",
        "",
        "![samples](optimize_samples.png)",
        "",
        "One seed per class (rows: not optimised, then each row of the table at lambda 1).",
        "",
    ]
    (out / ("optimize.md")).write_text("\n".join(text))
    (out / "optimize.json").write_text(json.dumps(
        {"protocol": asdict(p), "baseline": base, "rows": summaries,
         "chosen": [(s["reg"], s["lam"]) for s in chosen],
         "winner": None if best is None else [best["reg"], best["lam"]],
         "missing": missing}, indent=1))


def plot_curves(path: Path, rows: list[dict], p: Protocol) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(p.lams), figsize=(6 * len(p.lams), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    regs = ["none", *p.regs]
    for ax, lam in zip(axes[0], p.lams):
        for j, reg in enumerate(regs):
            row = next((r for r in rows if r["reg"] == reg and (reg == "none" or r["lam"] == lam)),
                       None)
            if row is None:
                continue
            it = np.arange(len(row["curve_target"]))
            ax.plot(it, row["curve_target"], color=colors(j % 10), lw=1.4, label=reg)
            ax.plot(it, row["curve_heldout"], color=colors(j % 10), lw=1.2, ls="--")
        ax.set_title(f"lambda = {lam:g} (solid: target judge A, dashed: held-out judge B)",
                     fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean log p(c)")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(path: Path, rows: list[dict]) -> None:
    from latentgeo.images import label_rows, make_grid, save_image, upscale

    picks = [r for r in rows if r["reg"] == "none" or r["lam"] == max(x["lam"] for x in rows)]
    base = rows[0]
    n = len(base["a_hit"])
    per = max(1, n // 10)
    idx = list(range(0, n, per))[:10]
    stack = [base["images0"][idx]] + [r["images"][idx] for r in picks]
    names = ["start"] + [r["reg"] if r["reg"] == "none" else f"{r['reg']} {r['lam']:g}"
                         for r in picks]
    grid = make_grid(torch.cat(stack), nrow=len(idx))
    grid = label_rows(upscale(grid, 2), names, cell_height=2 * 34, padding=4)
    save_image(path, grid, force=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke protocol")
    ap.add_argument("--out", type=Path, default=None, help="report folder")
    ap.add_argument("--work", type=Path, default=None, help="row cache (resumable)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the rows "
                    "cached so far (do not run the missing ones)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = QUICK if args.quick else FULL
    out = args.out or ROOT / ("docs/results-quick" if args.quick else "docs/results")
    work = args.work or ROOT / "out" / ("optimize_table_quick" if args.quick else "optimize_table")
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "protocol.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != json.loads(json.dumps(asdict(p))):
        log(f"{work} holds rows of another protocol: delete it or pass --work")
        return 2
    stamp.write_text(json.dumps(asdict(p)))

    backend = load_model("bundled")
    judges = Judges()
    n = p.per_class * p.classes
    labels = np.repeat(np.arange(p.classes), p.per_class)
    g = torch.Generator().manual_seed(p.seed)
    seeds = torch.randn((n, *backend.latent_shape), generator=g)
    real = judges(load_mnist_split().heldout_images, np.zeros(500, dtype=np.int64))["features"]
    base_eval = evaluate(backend, judges, seeds, seeds, labels, p.steps)
    base_eval.update(n=n, reg="(not optimised)", lam=0.0)
    rows, missing = [], []
    for reg, lam in rows_of(p):
        key = row_key(reg, lam)
        row = load_row(work, key)
        if row is None and not args.report_only:
            log(f"row {reg} lambda {lam:g}: optimising {n} seeds, {p.iters} iterations")
            row = run_row(backend, judges, seeds, labels, p, reg, lam)
            save_row(work, key, row)
            log(f"row {reg} lambda {lam:g}: done in {row['wall_s']:.0f} s; target "
                f"{np.mean(row['a_hit']):.2f}, held-out {np.mean(row['b_hit']):.2f}")
        if row is None:
            missing.append(f"{reg} {lam:g}")
            continue
        rows.append(row)
    if not rows:
        log("no rows yet")
        return 1
    rows[0]["images0"] = base_eval["images"]
    summaries = [summarise(r, real, p.n_boot) for r in rows]
    base = summarise(base_eval, real, p.n_boot)
    base["seconds_per_iter"] = None
    write_report(out, p, base, summaries, rows, args.quick, missing)
    log(f"wrote {out / 'optimize.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
