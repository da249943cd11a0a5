"""The NAO paper's rare-concept pipeline in miniature (issue 14): SeedSelect from random seeds
vs from NAO starts, on the bundled digit model, on a CPU.

    OMP_NUM_THREADS=1 python benchmarks/rare_concepts.py            # full protocol
    python benchmarks/rare_concepts.py --jobs 2                       # two workers over classes
    python benchmarks/rare_concepts.py --quick --out /tmp/q           # smoke run (seconds)

Protocol (seed fixed): the bundled model, unconditional (null class, guidance 1: the concept
comes only from the examples), 20 DDIM steps. For each digit class c, k = 5 example images drawn
from the model's training split (``numpy.random.default_rng([seed, c])``). Methods, N = 20
images per class:

* ``random``        — 20 Gaussian seeds, rendered;
* ``random+ss``     — the same seeds, SeedSelect (``--preset seedselect``: AdamW lr 0.1, /10
  from iteration 3, 30 iterations) with the ``match`` reward of the 5 examples;
* ``nao``           — the examples inverted (fixed point, 20 steps), their NAO centroid and
  points along the NAO paths from it towards each example (``start_seeds(method="nao")``),
  rendered without optimisation;
* ``nao+ss``        — those starts, SeedSelect with ``--preset nao-seedselect`` (5 iterations,
  lr 0.05);
* ``normalized+ss`` — ``start_seeds(method="normalized")`` (the normalized-mean centroid of the
  inversions), the same 5-iteration SeedSelect.

Columns: judge-B accuracy (the judge the loop never saw; Wilson 95%); diversity (mean pairwise
Euclidean distance of judge-B features within a class, averaged over classes); realism (KID of
judge-B features of a class's renders against the 50 held-out real digits of that class,
averaged over classes); network evaluations (NFE) per image, counted by a forward hook on the
UNet (rows through the network; a backward through it counts two; the inversion of the
examples is shared by the N images of a class; the final render of the returned seeds
included); wall seconds per image (one thread; load average recorded). Intervals of
diversity and KID: delete-one jackknife over the renders of each class, combined over classes.

Downstream: a fresh small CNN (recipe in :func:`train_classifier`) trained on the 5 examples per
class alone, and on the examples + the 20 generated images per class of each method (labelled
with the class they were generated for), accuracy on the 500 held-out real digits; mean and
t interval over 3 training seeds.

Every (method, class) cell is cached under ``--cache`` as soon as it is done (a rerun resumes;
delete the folder to start over). ``--classes``/``--methods`` measure subsets; ``--jobs 2`` runs
two worker processes over the classes (each one thread) and then writes the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentgeo.classifier import load_judge
from latentgeo.data import load_mnist_split
from latentgeo.diffusion import load_model, render
from latentgeo.evaluation import kernel_inception_distance, wilson_interval

ROOT = Path(__file__).resolve().parent.parent
#: Measurement order inside a worker: the cheap methods first, the 30-iteration one last.
METHODS = ("random", "nao", "nao+ss", "normalized+ss", "random+ss")
LABELS = {"random": "random seeds", "random+ss": "random + SeedSelect",
          "nao": "NAO centroid + paths", "nao+ss": "NAO + SeedSelect",
          "normalized+ss": "normalized mean + SeedSelect"}
#: method -> (start, SeedSelect preset or None)
PLAN = {"random": ("random", None), "random+ss": ("random", "seedselect"),
        "nao": ("nao", None), "nao+ss": ("nao", "nao-seedselect"),
        "normalized+ss": ("normalized", "nao-seedselect")}


@dataclass(frozen=True)
class Protocol:
    k: int                      # examples per class
    n: int                      # generated images per class and method
    steps: int                  # DDIM steps (render, optimisation and inversion)
    classes: tuple[int, ...]
    ss_iters: int | None        # SeedSelect iterations from random seeds (None: the preset's)
    nao_iters: int | None       # iterations of the nao-seedselect runs (None: the preset's)
    clf_seeds: int              # training seeds of the downstream classifier
    clf_steps: int              # optimiser steps of one downstream training run
    seed: int = 0


FULL = Protocol(k=5, n=20, steps=20, classes=tuple(range(10)), ss_iters=None, nao_iters=None,
                clf_seeds=3, clf_steps=400)
QUICK = Protocol(k=3, n=4, steps=4, classes=(0, 1), ss_iters=2, nao_iters=1, clf_seeds=2,
                 clf_steps=10)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------


def select_examples(split, p: Protocol, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in the training split) of the k examples of class c and of n further
    training digits of c (the "real" reference row): one draw without replacement from
    ``default_rng([seed, c])``."""
    idx = np.flatnonzero(split.train_labels.numpy() == c)
    pick = np.random.default_rng([p.seed, c]).choice(idx, size=p.k + p.n, replace=False)
    return pick[:p.k], pick[p.k:]


def random_seeds(backend, p: Protocol, c: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * p.seed + c)
    return torch.randn((p.n, *backend.latent_shape), generator=g)


# -- network-evaluation counter -----------------------------------------------------------------


class NFECounter:
    """Counts rows through ``module``: every forward row is one evaluation, every row a
    gradient flows back through counts two more (a backward is about two forwards)."""

    def __init__(self, module: nn.Module) -> None:
        self.forward = 0
        self.backward = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        x = out[0] if isinstance(out, (tuple, list)) else out
        self.forward += int(x.shape[0])
        if x.requires_grad:
            x.register_hook(self._back)

    def _back(self, grad: torch.Tensor) -> None:
        self.backward += int(grad.shape[0])

    @property
    def total(self) -> int:
        return self.forward + 2 * self.backward

    def reset(self) -> None:
        self.forward = self.backward = 0

    def close(self) -> None:
        self._handle.remove()


# -- measuring one cell -------------------------------------------------------------------------


def load_average() -> float:
    return float(os.getloadavg()[0])


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def get_start(backend, counter: NFECounter, cache: Path, p: Protocol, start: str, c: int,
              refs: torch.Tensor) -> dict:
    """Start seeds of class c (cached: ``nao`` and ``nao+ss`` share one inversion)."""
    path = cache / f"start-{start}-c{c}.pt"
    if path.is_file():
        return torch.load(path)
    counter.reset()
    load0 = load_average()
    t0 = time.perf_counter()
    if start == "random":
        seeds, reported = random_seeds(backend, p, c), 0
    else:
        from latentgeo.optimize.init import start_seeds

        out = start_seeds(backend, refs, p.n, method=start, steps=p.steps)
        seeds, reported = out.seeds.detach().to(torch.float32).cpu(), int(out.nfe)
        if reported != counter.total:
            log(f"note: start_seeds reports {reported} NFE, the hook counted {counter.total}")
    blob = {"seeds": seeds, "seconds": time.perf_counter() - t0, "nfe": counter.total,
            "nfe_reported": reported, "load": [load0, load_average()]}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return blob


def settings_for(preset: str, p: Protocol):
    from latentgeo.optimize.presets import resolve

    iters = p.ss_iters if preset == "seedselect" else p.nao_iters
    return resolve(preset) if iters is None else resolve(preset, iters=iters)


def measure_cell(backend, counter: NFECounter, cache: Path, p: Protocol, method: str, c: int,
                 refs: torch.Tensor, jobs: int) -> dict:
    """Seeds -> (SeedSelect) -> final render of one (method, class) cell; cached."""
    key = f"cell-{method.replace('+', '_')}-c{c}"
    if (cache / f"{key}.json").is_file():
        return json.loads((cache / f"{key}.json").read_text())
    start, preset = PLAN[method]
    st = get_start(backend, counter, cache, p, start, c, refs)
    load0 = load_average()
    counter.reset()
    t0 = time.perf_counter()
    seeds, status, iters = st["seeds"], [], 0
    if preset is not None:
        from latentgeo.optimize import optimize
        from latentgeo.optimize.rewards import match_reward

        settings = settings_for(preset, p)
        iters = settings.iters
        reward = match_reward(backend, refs)
        res = optimize(backend, seeds, [reward], settings=settings, steps=p.steps,
                       condition=None, checkpoint=False)
        seeds, status = res.seeds.detach().to(torch.float32).cpu(), list(res.status)
    nfe_opt = counter.total
    counter.reset()
    images = render(backend, seeds, None, steps=p.steps, batch_size=max(1, p.n))
    wall = time.perf_counter() - t0
    row = {"method": method, "class": c, "n": int(seeds.shape[0]), "iters": iters,
           "nfe_start_total": int(st["nfe"]), "nfe_start_reported": int(st["nfe_reported"]),
           "nfe_optimise_total": int(nfe_opt), "nfe_render_total": int(counter.total),
           "seconds_start": float(st["seconds"]), "seconds_cell": float(wall),
           "load_start": [*st["load"]], "load": [load0, load_average()], "jobs": jobs,
           "threads": torch.get_num_threads(), "status": status}
    row["nfe_per_image"] = (row["nfe_start_total"] + row["nfe_optimise_total"]
                            + row["nfe_render_total"]) / row["n"]
    row["seconds_per_image"] = (row["seconds_start"] + row["seconds_cell"]) / row["n"]
    tmp = cache / f"{key}.pt.{os.getpid()}.tmp"
    torch.save({"images": images, "seeds": seeds}, tmp)
    os.replace(tmp, cache / f"{key}.pt")
    _atomic_json(cache / f"{key}.json", row)  # the cell counts as done only once this exists
    return row


def load_cell(cache: Path, method: str, c: int) -> tuple[dict, torch.Tensor] | None:
    key = f"cell-{method.replace('+', '_')}-c{c}"
    if not (cache / f"{key}.json").is_file():
        return None
    return json.loads((cache / f"{key}.json").read_text()), torch.load(cache / f"{key}.pt")[
        "images"]


def claim(cache: Path, key: str) -> bool:
    """Take the cell ``key`` for this process (a lock file holding its pid); False when a live
    process holds it. A lock left by a dead process is taken over. Lets extra workers join a
    running measurement (``--measure-only`` over the same cache) without measuring a cell
    twice."""
    lock = cache / f"{key}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or "0")
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError, FileNotFoundError):
            lock.write_text(str(os.getpid()))  # stale lock: its process is gone
            return True
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def measure(p: Protocol, cache: Path, classes: list[int], methods: list[str], jobs: int) -> None:
    torch.set_num_threads(1)
    backend = load_model("bundled")
    counter = NFECounter(backend.unet)
    split = load_mnist_split()
    for method in methods:
        for c in classes:
            ex, _ = select_examples(split, p, c)
            refs = split.train_images[ex]
            key = f"cell-{method.replace('+', '_')}-c{c}"
            if (cache / f"{key}.json").is_file() or not claim(cache, key):
                continue
            log(f"{method} class {c}: measuring")
            try:
                row = measure_cell(backend, counter, cache, p, method, c, refs, jobs)
            finally:
                (cache / f"{key}.lock").unlink(missing_ok=True)
            log(f"{method} class {c}: {row['seconds_per_image']:.2f} s/image, "
                f"{row['nfe_per_image']:.0f} NFE/image (load {row['load'][1]:.2f})")
    counter.close()


# -- statistics ---------------------------------------------------------------------------------


def mean_pairwise_distance(feats: np.ndarray) -> float:
    f = np.asarray(feats, dtype=np.float64)
    d = np.sqrt(np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0.0))
    n = len(f)
    return float(d.sum() / (n * (n - 1)))


def jackknife(stat, feats: np.ndarray) -> tuple[float, float]:
    """(estimate, delete-one jackknife standard error) of ``stat(rows)`` (Efron & Stein)."""
    n = len(feats)
    est = stat(feats)
    vals = np.array([stat(np.delete(feats, i, axis=0)) for i in range(n)])
    return est, float(np.sqrt((n - 1) / n * ((vals - vals.mean()) ** 2).sum()))


def combine(per_class: list[tuple[float, float]]) -> list[float]:
    """Mean over classes of independent per-class estimates with a normal 95% interval."""
    est = float(np.mean([e for e, _ in per_class]))
    se = float(np.sqrt(sum(s * s for _, s in per_class)) / len(per_class))
    return [est, est - 1.96 * se, est + 1.96 * se]


def newcombe_difference(k1: int, n1: int, k2: int, n2: int) -> list[float]:
    """p1 - p2 with Newcombe's hybrid score 95% interval (method 10, Newcombe 1998)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return [d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)]


class JudgeB:
    """Judge B's predictions and features; judge A's predictions beside them (the loop
    optimises judge A's features, so A's accuracy is the seen side of the gap)."""

    def __init__(self) -> None:
        self.judge = load_judge("b").eval()
        self.a = load_judge("a").eval()

    @torch.no_grad()
    def seen(self, images: torch.Tensor) -> np.ndarray:
        return self.a(images).argmax(1).numpy()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats = self.judge.features(images)
        pred = self.judge.head(feats).argmax(1)
        return pred.numpy(), feats.numpy().astype(np.float64)


def summarise(name: str, per_class: dict[int, dict], real: dict[int, np.ndarray]) -> dict:
    """per_class[c] = {pred, feats, row (or None)} -> one table row."""
    hits = sum(int((v["pred"] == c).sum()) for c, v in per_class.items())
    hits_a = sum(int((v["pred_a"] == c).sum()) for c, v in per_class.items())
    n = sum(len(v["pred"]) for v in per_class.values())
    div = [jackknife(mean_pairwise_distance, v["feats"]) for v in per_class.values()]
    kids = [jackknife(lambda f, c=c: kernel_inception_distance(f, real[c]), v["feats"])
            for c, v in per_class.items()]
    rows = [v["row"] for v in per_class.values() if v.get("row") is not None]
    out = {"name": name, "n": n, "classes": sorted(per_class),
           "accuracy": [hits / n, *wilson_interval(hits, n)], "hits": hits,
           "accuracy_a": [hits_a / n, *wilson_interval(hits_a, n)],
           "per_class_hits": {str(c): int((v["pred"] == c).sum()) for c, v in per_class.items()},
           "diversity": combine(div), "kid": combine(kids),
           "per_class_kid": {str(c): k[0] for c, k in zip(per_class, kids)},
           "per_class_diversity": {str(c): d[0] for c, d in zip(per_class, div)}}
    if rows:
        out["nfe_per_image"] = float(np.mean([r["nfe_per_image"] for r in rows]))
        out["nfe_parts_per_image"] = {
            part: float(np.mean([r[f"nfe_{part}_total"] / r["n"] for r in rows]))
            for part in ("start", "optimise", "render")}
        out["seconds_per_image"] = float(np.mean([r["seconds_per_image"] for r in rows]))
        loads = [x for r in rows for x in (*r["load_start"], *r["load"])]
        out["load_range"] = [min(loads), max(loads)]
        out["jobs"] = sorted({r["jobs"] for r in rows})
        out["stopped_early"] = sum(s not in ("done", "reached target") for r in rows
                                   for s in r["status"])
        out["iters"] = rows[0]["iters"]
    return out


# -- downstream classifier ----------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv 5x5 1->16, ReLU, max-pool 2 -> conv 5x5 16->32, ReLU, max-pool 2 -> linear
    2048->64, ReLU, dropout 0.25 -> linear 64->10."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Dropout(0.25), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image translated by integers in [-max_shift, max_shift] (zero fill)."""
    pad = torch.nn.functional.pad(x, (max_shift,) * 4)
    s = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=g)
    h, w = x.shape[-2:]
    return torch.stack([pad[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(s.tolist())])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int, steps: int
                     ) -> SmallCNN:
    """The fixed downstream recipe: :class:`SmallCNN` (torch default init under
    ``manual_seed(seed)``), Adam lr 1e-3, weight decay 1e-4, batches of 32 drawn by shuffled
    passes over the training set, random shifts of up to 2 px, ``steps`` optimiser steps
    whatever the set size (equal compute for every training set), one thread."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    pos = 0
    model.train()
    for _ in range(steps):
        if pos + 32 > len(order):
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos:pos + 32]
        pos += 32
        x = random_shift(images[idx], g)
        loss = nn.functional.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(images).argmax(1) == labels).double().mean())


def t_interval(values: list[float]) -> list[float]:
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return [float(v.mean()), float("nan"), float("nan")]
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return [float(v.mean()), max(0.0, float(v.mean() - half)), min(1.0, float(v.mean() + half))]


def downstream(p: Protocol, sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
               test: tuple[torch.Tensor, torch.Tensor], cache: Path) -> dict:
    """name -> {accuracies per seed, mean [t 95%]} (cached per set and seed)."""
    path = cache / "downstream.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    for name, (x, y) in sets.items():
        accs = []
        for s in range(p.clf_seeds):
            key = f"{name}|n={len(x)}|seed={s}"
            if key not in done:
                t0 = time.perf_counter()
                done[key] = accuracy(train_classifier(x, y, s, p.clf_steps), *test)
                log(f"downstream {name} seed {s}: {100 * done[key]:.1f}% "
                    f"({time.perf_counter() - t0:.0f} s)")
                _atomic_json(path, done)
            accs.append(done[key])
        out[name] = {"train_size": len(x), "per_seed": accs, "accuracy": t_interval(accs)}
    return out


# -- report -------------------------------------------------------------------------------------


def pct(v: list[float]) -> str:
    if any(map(math.isnan, v)):
        return f"{100 * v[0]:.1f}%"
    return f"{100 * v[0]:.1f}% [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"


def ci(v: list[float], digits: int = 2) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def kid_fmt(v: list[float]) -> str:
    return f"{v[0]:.3g} [{v[1]:.3g}, {v[2]:.3g}]"


def verdict(p: Protocol, rows: dict[str, dict], down: dict[str, dict],
            anchors: dict[str, dict] | None = None) -> list[str]:
    gen = {m: rows[m] for m in METHODS if m in rows}
    out: list[str] = []
    if not gen:
        return ["(no method measured)"]
    best = max(gen.values(), key=lambda r: r["accuracy"][0])
    tied = [LABELS[m] for m, r in gen.items() if r is not best
            and r["accuracy"][2] >= best["accuracy"][1]]
    out.append(f"- **Accuracy (judge B)**: highest is {LABELS[best['name']]}, "
               f"{pct(best['accuracy'])}"
               + (f"; its interval overlaps those of {', '.join(tied)}, so with n = "
                  f"{best['n']} that ranking is not significant." if tied else
                  "; its interval overlaps no other method's."))
    div = max(gen.values(), key=lambda r: r["diversity"][0])
    tied = [LABELS[m] for m, r in gen.items() if r is not div
            and r["diversity"][2] >= div["diversity"][1]]
    line = (f"- **Diversity**: highest is {LABELS[div['name']]}, {ci(div['diversity'])}"
            + (f" (interval overlaps {', '.join(tied)})" if tied else ""))
    if div["accuracy"][0] < 0.9:
        good = {m: r for m, r in gen.items() if r["accuracy"][0] >= 0.9}
        line += (f", but {100 * (1 - div['accuracy'][0]):.0f}% of its renders are other "
                 "digits (judge B)")
        if good:
            g = max(good.values(), key=lambda r: r["diversity"][0])
            line += (f"; among the rows with at least 90% accuracy the most diverse is "
                     f"{LABELS[g['name']]}, {ci(g['diversity'])}")
    real = next(iter(anchors.values()), None) if anchors else None
    if real is not None:
        line += f" (real digits of the class: {ci(real['diversity'])})"
    out.append(line + ".")
    kid = min(gen.values(), key=lambda r: r["kid"][0])
    tied = [LABELS[m] for m, r in gen.items() if r is not kid
            and r["kid"][1] <= kid["kid"][2]]
    out.append(f"- **Realism**: lowest class-wise KID is {LABELS[kid['name']]}, "
               f"{kid_fmt(kid['kid'])}" + (f" (interval overlaps {', '.join(tied)})." if tied
                                           else "."))
    costed = {m: r for m, r in gen.items() if "nfe_per_image" in r}
    ss = {m: r for m, r in costed.items() if PLAN[m][1] is not None}
    if costed:
        cheap = min(costed.values(), key=lambda r: r["nfe_per_image"])
        line = (f"- **Cost**: cheapest is {LABELS[cheap['name']]} "
                f"({cheap['nfe_per_image']:.0f} NFE per image)")
        if ss:
            low = min(r["nfe_per_image"] for r in ss.values())
            names = [LABELS[m] for m, r in ss.items() if r["nfe_per_image"] == low]
            line += (f"; among the SeedSelect runs {' and '.join(names)} ({low:.0f} NFE per "
                     "image" + (", a tie" if len(names) > 1 else "") + ")")
        out.append(line + ". The seconds column follows the NFE but is confounded by load "
                   "(the rows ran one after another while the 1-min load average of the "
                   f"2-core machine ranged {min(r['load_range'][0] for r in costed.values()):.1f}"
                   f"-{max(r['load_range'][1] for r in costed.values()):.1f}): NFE is the cost "
                   "measure here.")
    for opt, base in (("nao+ss", "nao"), ("random+ss", "random")):
        if opt in costed and base in costed:
            a_, b_ = costed[opt], costed[base]
            d = newcombe_difference(a_["hits"], a_["n"], b_["hits"], b_["n"])
            out.append(
                f"- **What SeedSelect adds to {LABELS[base]}** ({b_['nfe_per_image']:.0f} -> "
                f"{a_['nfe_per_image']:.0f} NFE per image): accuracy {100 * d[0]:+.1f} points "
                f"[{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] (Newcombe 95%), diversity "
                f"{ci(b_['diversity'])} -> {ci(a_['diversity'])}, KID {kid_fmt(b_['kid'])} -> "
                f"{kid_fmt(a_['kid'])}.")
    if "nao" in costed and "random+ss" in costed:
        a_, b_ = costed["nao"], costed["random+ss"]
        d = newcombe_difference(a_["hits"], a_["n"], b_["hits"], b_["n"])
        out.append(
            f"- The NAO start alone, with no optimisation ({a_['nfe_per_image']:.0f} NFE per "
            f"image, {a_['nfe_per_image'] / b_['nfe_per_image']:.2f} of random + SeedSelect's),"
            f" differs from random + SeedSelect by {100 * d[0]:+.1f} points of accuracy "
            f"[{100 * d[1]:+.1f}, {100 * d[2]:+.1f}].")
    if "random+ss" in costed and "nao+ss" in costed:
        r, n = costed["random+ss"], costed["nao+ss"]
        ratio = n["nfe_per_image"] / r["nfe_per_image"]
        diff = newcombe_difference(n["hits"], n["n"], r["hits"], r["n"])
        reached = diff[0] >= 0
        out.append(
            f"- **The paper's claim** (NAO start reaches SeedSelect's accuracy with <= 1/4 of "
            f"its network evaluations): NAO + SeedSelect uses {ratio:.2f} of the NFE of random "
            f"+ SeedSelect ({n['nfe_per_image']:.0f} vs {r['nfe_per_image']:.0f} per image: "
            f"{'within' if ratio <= 0.25 else 'above'} the quarter); its accuracy is "
            f"{pct(n['accuracy'])} vs {pct(r['accuracy'])}, difference "
            f"{100 * diff[0]:+.1f} points [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}] "
            "(Newcombe 95%). "
            + ("It exceeds SeedSelect's accuracy significantly" if diff[1] > 0 else
               "It reaches SeedSelect's accuracy (point estimate at or above)"
               if reached else
               ("It does not reach it on the point estimate, but the difference is not "
                "significant" if diff[2] >= 0 else
                "It does not reach it: the difference is significantly negative"))
            + (". " if reached else "; ")
            + ("Both parts hold: the claim holds here." if reached and ratio <= 0.25 else
               "The claim does not hold here (" + " and ".join(
                   x for x, bad in (("accuracy not reached", not reached),
                                    ("more than a quarter of the NFE", ratio > 0.25)) if bad)
               + ")."))
    else:
        out.append("- The paper's claim cannot be checked: "
                   + ", ".join(LABELS[m] for m in ("random+ss", "nao+ss") if m not in costed)
                   + " not measured.")
    if down:
        real = down.get("examples only")
        gens = {k: v for k, v in down.items() if k in LABELS.values()}
        if gens and real:
            top = max(gens.items(), key=lambda kv: kv[1]["accuracy"][0])
            out.append(
                f"- **Downstream**: the best training set with generated images is "
                f"examples + {top[0]} ({pct(top[1]['accuracy'])} held-out accuracy) vs "
                f"{pct(real['accuracy'])} "
                f"from the {p.k} examples per class alone (mean over {p.clf_seeds} training "
                "seeds; the interval is over training seeds only): "
                + ("above the examples alone, intervals disjoint" if top[1]["accuracy"][1]
                   > real["accuracy"][2] else "below the examples alone, intervals disjoint"
                   if top[1]["accuracy"][2] < real["accuracy"][1] else
                   "the intervals overlap, no significant difference")
                + ". " + ("Adding the generated images helps no method significantly."
                          if all(v["accuracy"][1] <= real["accuracy"][2] for v in gens.values())
                          else "")
                + "".join(f" With {k} (a reference, not a method): "
                          f"{pct(v['accuracy'])}." for k, v in down.items()
                          if k.endswith(" real")))
    return out


def write_report(out: Path, p: Protocol, quick: bool, rows: dict[str, dict],
                 anchors: dict[str, dict], down: dict[str, dict], missing: list[str],
                 samples: Path | None, test_y: torch.Tensor,
                 timing: list[dict] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/rare_concepts.py" + (" --quick" if quick else "")
    test_acc = down["examples only"]["accuracy"][0] if "examples only" in down else 0.5
    lo, hi = wilson_interval(round(test_acc * len(test_y)), len(test_y))
    test_half = 100 * (hi - lo) / 2
    head = ("| method | n | judge-B accuracy [95%] | diversity [95%] | KID to the class "
            "[95%] | NFE / image | s / image | judge-A accuracy (seen) |")
    table = [head, "|---|---|---|---|---|---|---|---|"]
    for name, r in anchors.items():
        table.append(f"| *{name}* | {r['n']} | {pct(r['accuracy'])} | {ci(r['diversity'])} | "
                     f"{kid_fmt(r['kid'])} | - | - | {pct(r['accuracy_a'])} |")
    for m in METHODS:
        if m not in rows:
            table.append(f"| {LABELS[m]} | - | not measured | | | | | |")
            continue
        r = rows[m]
        table.append(f"| {LABELS[m]} | {r['n']} | {pct(r['accuracy'])} | "
                     f"{ci(r['diversity'])} | {kid_fmt(r['kid'])} | "
                     f"{r['nfe_per_image']:.0f} | {r['seconds_per_image']:.2f} | "
                     f"{pct(r['accuracy_a'])} |")
    parts = ["| method | iterations | start (inversion, shared) | optimisation | final render |"
             " load average (1 min) | workers |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        if m in rows:
            r = rows[m]
            q = r["nfe_parts_per_image"]
            parts.append(f"| {LABELS[m]} | {r['iters']} | {q['start']:.1f} | "
                         f"{q['optimise']:.0f} | {q['render']:.0f} | "
                         f"{r['load_range'][0]:.2f}-{r['load_range'][1]:.2f} | "
                         f"{', '.join(map(str, r['jobs']))} |")
    classes = list(p.classes)
    per = ["| method | " + " | ".join(str(c) for c in classes) + " |",
           "|---|" + "---|" * len(classes)]
    for name, r in [*anchors.items(), *((LABELS[m], rows[m]) for m in METHODS if m in rows)]:
        hits = r["per_class_hits"]
        per.append(f"| {name} | " + " | ".join(
            f"{hits[str(c)]}/{p.n} (KID {r['per_class_kid'][str(c)]:.2f})"
            if str(c) in hits else "-" for c in classes) + " |")
    dtable = ["| training set | images | held-out accuracy, mean [t 95%] | per seed |",
              "|---|---|---|---|"]
    for name, d in down.items():
        dtable.append(f"| {name} | {d['train_size']} | {pct(d['accuracy'])} | "
                      + ", ".join(f"{100 * a:.1f}" for a in d["per_seed"]) + " |")
    text = [
        "# Rare concepts from a few images: SeedSelect and the NAO pipeline"
        + (" (QUICK smoke run)" if quick else ""), "",
        f"`{cmd}` regenerates this page (seed {p.seed} fixed; `--jobs 2` runs two workers over "
        "the classes). Protocol: the bundled model, **unconditional** (null class, guidance 1: "
        f"the concept comes only from the examples), {p.steps} DDIM steps; for each digit class "
        f"({', '.join(map(str, p.classes))}) k = {p.k} example images drawn from the training "
        f"split; N = {p.n} images per class and method.", "",
        "Methods (`latentgeo.optimize`): *random seeds* — N Gaussian seeds per class, "
        "rendered; *random + SeedSelect* — the same seeds optimised with the `match` reward of "
        "the examples (SeedSelect's loss: 10 x semantic term on judge A's penultimate features "
        "of the clean estimates of the last 3 sampler states, weights 0.05/0.25/0.7, + MSE of "
        "the final clean latent to the examples' mean) under `--preset seedselect` (AdamW lr "
        f"0.1, /10 from iteration 3, {p.ss_iters or 30} iterations); *NAO centroid + paths* — "
        f"the examples inverted (fixed point, {p.steps} steps, guidance 1), their NAO centroid "
        "and points equally spaced along the NAO paths from it towards each inversion, "
        "stopping short of the inversion (`start_seeds(method=\"nao\")`), rendered, no "
        "optimisation; *NAO + SeedSelect* — those starts under `--preset nao-seedselect` "
        f"(AdamW lr 0.05, /10 from iteration 3, {p.nao_iters or 5} iterations); *normalized "
        "mean + SeedSelect* — the normalized mean of the inversions (the Euclidean mean "
        "rescaled to the chi mode) as centroid, the same NAO paths from it, the same "
        "5-iteration run. Every optimised seed is the best iterate by the optimised "
        "objective (the loop's rule).", "",
        "> **Caveat: no class is rare for this model.** The bundled model was trained on every "
        "digit class (4,500 training digits, the examples among them), so this measures how "
        "well each start and optimiser steers an unconditional model towards a class it knows, "
        "not generation of a concept the model never saw.", "",
        *table, "",
        "Columns: *judge-B accuracy* the share of renders judge B (the held-out judge: the "
        "loop optimises judge A's features, never B) classifies as the class of the examples, "
        f"Wilson 95%, n = {p.n} x {len(p.classes)} classes; *diversity* mean pairwise Euclidean "
        "distance between judge-B features of the renders of one class, averaged over classes "
        "(every render counts, of the class or not: a row of mostly other digits is diverse); "
        "*KID* kernel inception distance (cubic kernel, judge-B features, unbiased, can be "
        f"slightly negative) between the {p.n} renders of a class and the 50 held-out real "
        "digits of that class, averaged over classes (per-class values below); both with a "
        "delete-one jackknife over the renders of each class, combined over classes (normal "
        "95%). *NFE / image*: rows through the UNet counted by a forward hook, a backward "
        "through it counted as two, everything a user runs: the inversion of the examples "
        f"(shared: divided by the {p.n} images), every SeedSelect iteration, and the final "
        "render of the returned seeds. *s / image*: wall seconds of the same work, one thread "
        "on a shared 2-core machine (load averages below: indicative, not a benchmark). "
        "*judge-A accuracy*: the same with judge A, whose features the loop optimises (not "
        "its class: the gap to judge B shows how much of the gain is specific to the seen "
        "network). Rows in italics are real digits for reference: "
        f"{p.n} further training digits per class (not the examples).", "",
        "## Verdict", "", *verdict(p, rows, down, anchors), "",
    ]
    if missing:
        text += [f"**Incomplete run**: cells not measured (never invented): "
                 f"{', '.join(missing)}. Rows with missing cells average the classes measured "
                 "(listed in the JSON).", ""]
    text += ["## Cost breakdown (NFE per image)", "", *parts, ""]
    if timing:
        c0 = timing[0]["class"]
        text += [f"Timing check (`--timing`): class {c0} measured again for every method, back "
                 "to back in one process (the cells above ran one after another under changing "
                 "load), from scratch (its own inversion):", "",
                 "| method | NFE / image | s / image | ms per NFE | load average (1 min) | "
                 "images bit-identical to the table's cell |", "|---|---|---|---|---|---|"]
        for r in timing:
            loads = [*r["load_start"], *r["load"]]
            text.append(f"| {LABELS[r['method']]} | {r['nfe_per_image']:.0f} | "
                        f"{r['seconds_per_image']:.2f} | "
                        f"{1000 * r['seconds_per_image'] / r['nfe_per_image']:.1f} | "
                        f"{min(loads):.2f}-{max(loads):.2f} | "
                        + {True: "yes", False: "**no**", None: "-"}[r.get("identical")] + " |")
        text.append("")
    text += [
             "## Per class (judge-B hits / N, class-wise KID)", "", *per, "",
             "## Downstream classifier", "",
             "A fresh small CNN (conv 5x5 1->16, ReLU, max-pool; conv 5x5 16->32, ReLU, "
             "max-pool; linear 2048->64, ReLU, dropout 0.25; linear 64->10), Adam lr 1e-3, "
             f"weight decay 1e-4, batches of 32, random shifts of up to 2 px, {p.clf_steps} "
             "optimiser steps for every training set (equal compute whatever its size), "
             f"trained with {p.clf_seeds} seeds on: the {p.k} examples per class alone; the "
             f"examples + {p.n} further real training digits per class (reference); the "
             f"examples + the {p.n} images per class each method generated (labelled with the "
             f"class they were generated for). Accuracy on the {len(test_y)} held-out real digits "
             "of these classes (never "
             "used to train the model or the judges); the interval is a t interval over the "
             f"training seeds only (test-set sampling alone: +/-{test_half:.1f} points, the Wilson "
             f"half-width at {100 * test_acc:.0f}% on {len(test_y)} digits).", "",
             *dtable, ""]
    if samples is not None:
        text += ["## Samples", "", f"![samples]({samples.name})", "",
                 "Columns: classes; rows: the first example, then the first image of each "
                 "method (for NAO starts the centroid's render).", "",
                 f"![class {p.classes[0]}](rare_concepts_class{p.classes[0]}.png)", "",
                 f"Every image of class {p.classes[0]} (the first class, not a chosen one): the "
                 f"{p.k} examples, then the {p.n} images of each method.", ""]
    (out / "rare_concepts.md").write_text("\n".join(text))
    _atomic_json(out / "rare_concepts.json", {
        "protocol": asdict(p), "quick": quick, "rows": rows, "anchors": anchors,
        "downstream": down, "missing": missing, "labels": LABELS})


def plot_samples(path: Path, examples: dict[int, torch.Tensor],
                 images: dict[str, dict[int, torch.Tensor]], classes: list[int]) -> Path:
    from latentgeo.images import label_rows, make_grid, save_image, upscale

    names, stack = ["example"], [torch.stack([examples[c][0] for c in classes])]
    blank = torch.full((1, 32, 32), 0.5)
    for m in METHODS:
        if m in images:
            names.append(LABELS[m])
            stack.append(torch.stack([images[m][c][0] if c in images[m] else blank
                                      for c in classes]))
    grid = make_grid(torch.cat(stack), nrow=len(classes))
    grid = label_rows(upscale(grid, 2), names, cell_height=2 * 34, padding=4)
    save_image(path, grid, force=True)
    return path


def plot_class(path: Path, c: int, examples: torch.Tensor,
               images: dict[str, dict[int, torch.Tensor]]) -> Path:
    from latentgeo.images import label_rows, make_grid, save_image, upscale

    names, stack = ["examples"], [examples]
    width = max([len(examples)] + [len(images[m][c]) for m in METHODS
                                   if c in images.get(m, {})])
    blank = torch.full((1, 1, 32, 32), 0.5)
    for m in METHODS:
        if c in images.get(m, {}):
            names.append(LABELS[m])
            stack.append(images[m][c])
    stack = [torch.cat([s, blank.expand(width - len(s), -1, -1, -1)]) for s in stack]
    grid = make_grid(torch.cat(stack), nrow=width)
    grid = label_rows(upscale(grid, 2), names, cell_height=2 * 34, padding=4)
    save_image(path, grid, force=True)
    return path


def report(p: Protocol, cache: Path, out: Path, quick: bool) -> int:
    torch.set_num_threads(1)
    split = load_mnist_split()
    judge = JudgeB()
    held_x, held_y = split.heldout_images, split.heldout_labels
    keep = torch.isin(held_y, torch.tensor(p.classes))  # all 500 in the full protocol
    test = (held_x[keep], held_y[keep])
    real = {c: judge(held_x[held_y == c])[1] for c in p.classes}
    examples, extra = {}, {}
    for c in p.classes:
        ex, more = select_examples(split, p, c)
        examples[c], extra[c] = split.train_images[ex], split.train_images[more]
    anchors = {}
    ev = {}
    for c in p.classes:
        pred, feats = judge(extra[c])
        ev[c] = {"pred": pred, "feats": feats, "pred_a": judge.seen(extra[c])}
    anchors[f"real: {p.n} other training digits"] = summarise("real", ev, real)
    rows, images, missing = {}, {}, []
    for m in METHODS:
        per_class = {}
        for c in p.classes:
            got = load_cell(cache, m, c)
            if got is None:
                missing.append(f"{m} class {c}")
                continue
            row, imgs = got
            pred, feats = judge(imgs)
            per_class[c] = {"pred": pred, "feats": feats, "row": row,
                            "pred_a": judge.seen(imgs)}
            images.setdefault(m, {})[c] = imgs
        if per_class:
            rows[m] = summarise(m, per_class, real)
    ex_x = torch.cat([examples[c] for c in p.classes])
    ex_y = torch.tensor([c for c in p.classes for _ in range(p.k)])
    sets = {"examples only": (ex_x, ex_y),
            f"examples + {p.n} real": (torch.cat([ex_x, *(extra[c] for c in p.classes)]),
                                       torch.cat([ex_y, torch.tensor(
                                           [c for c in p.classes for _ in range(p.n)])]))}
    for m in METHODS:
        if m in images and len(images[m]) == len(p.classes):
            gx = torch.cat([images[m][c] for c in p.classes])
            gy = torch.tensor([c for c in p.classes for _ in range(len(images[m][c]))])
            sets[LABELS[m]] = (torch.cat([ex_x, gx]), torch.cat([ex_y, gy]))
    down = downstream(p, sets, test, cache)
    samples = None
    if images:
        out.mkdir(parents=True, exist_ok=True)
        samples = plot_samples(out / "rare_concepts_samples.png", examples, images,
                               list(p.classes))
        plot_class(out / f"rare_concepts_class{p.classes[0]}.png", p.classes[0],
                   examples[p.classes[0]], images)
    timing = [r for m in METHODS if (r := load_cell(cache / "timing", m, p.classes[0]))]
    for row, imgs in timing:  # the rerun must reproduce the table's cell bit for bit
        main_cell = images.get(row["method"], {}).get(p.classes[0])
        row["identical"] = None if main_cell is None else bool(torch.equal(imgs, main_cell))
    write_report(out, p, quick, rows, anchors, down, missing, samples, test[1],
                 [r[0] for r in timing])
    log(f"wrote {out / 'rare_concepts.md'}" + (f" ({len(missing)} cells missing)"
                                                if missing else ""))
    return 0


# -- driver -------------------------------------------------------------------------------------


def parse_list(text: str, allowed: list, kind: str, conv=str) -> list:
    items = [conv(x) for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"error: {kind} {text!r}: choose from {', '.join(map(str, allowed))}")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke protocol")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default docs/results)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cell cache (resumable; default benchmarks/.cache/rare_concepts[_quick])")
    ap.add_argument("--classes", default=None, help="comma-separated classes to measure")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated methods to measure ({', '.join(METHODS)})")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes over the classes")
    ap.add_argument("--measure-only", action="store_true", help="fill the cache, no report")
    ap.add_argument("--worker-jobs", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the cells cached so far")
    ap.add_argument("--timing", action="store_true",
                    help="timing check: measure the first class again for every method, back "
                         "to back in one process, into CACHE/timing (a table in the report)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    try:
        classes = parse_list(args.classes, list(p.classes), "classes", int) if args.classes \
            else list(p.classes)
        methods = parse_list(args.methods, list(METHODS), "methods") if args.methods \
            else list(METHODS)
    except ValueError:
        print(f"error: classes {args.classes!r}: expected digits separated by commas",
              file=sys.stderr)
        return 2
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: must be at least 1", file=sys.stderr)
        return 2
    out = args.out or ROOT / ("docs/results-quick" if args.quick else "docs/results")
    cache = args.cache or ROOT / "benchmarks" / ".cache" / (
        "rare_concepts_quick" if args.quick else "rare_concepts")
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / "protocol.json"
    proto = json.loads(json.dumps(asdict(p)))
    if stamp.is_file() and json.loads(stamp.read_text()) != proto:
        print(f"error: {cache} holds cells of another protocol: delete it or pass --cache",
              file=sys.stderr)
        return 2
    _atomic_json(stamp, proto)
    if args.timing:
        (cache / "timing").mkdir(exist_ok=True)
        measure(p, cache / "timing", [p.classes[0]], list(METHODS), 1)
        return 0
    if not args.report_only:
        if args.jobs == 1:
            measure(p, cache, classes, methods, args.worker_jobs or 1)
        else:
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            procs = []
            for j in range(args.jobs):
                part = classes[j::args.jobs]
                if not part:
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-only",
                       "--cache", str(cache), "--classes", ",".join(map(str, part)),
                       "--methods", ",".join(methods), "--worker-jobs", str(args.jobs)]
                procs.append(subprocess.Popen(cmd + (["--quick"] if args.quick else []),
                                              env=env))
            codes = [q.wait() for q in procs]
            if any(codes):
                log(f"a worker failed (exit codes {codes}); the report shows what is cached")
    if args.measure_only:
        return 0
    return report(p, cache, out, args.quick)


if __name__ == "__main__":
    sys.exit(main())
