"""Smoke test of the rare-concept table (benchmarks/rare_concepts.py --quick): two worker
processes fill the per-cell cache, the report, the JSON and the figure are written, a rerun
resumes without measuring; plus the statistics it uses, each against an independent check."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "rare_concepts.py"


def _module():
    spec = importlib.util.spec_from_file_location("rare_concepts", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rare_concepts"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _main(mod, argv: list[str]) -> int:
    """The script's main in this process (no interpreter start-up; its workers still are
    separate processes); the thread count it sets is restored."""
    threads = torch.get_num_threads()
    try:
        return mod.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_rare_concepts_quick_two_workers_and_resume(tmp_path, capfd):
    mod = _module()
    out, cache = tmp_path / "results", tmp_path / "cache"
    args = ["--quick", "--out", str(out), "--cache", str(cache)]
    assert _main(mod, [*args, "--jobs", "2"]) == 0, capfd.readouterr().err[-3000:]
    report = (out / "rare_concepts.md").read_text()
    for fragment in ("| method | n | judge-B accuracy [95%] | diversity [95%] | KID",
                     "no class is rare for this model", "| random + SeedSelect | 8 |",
                     "| NAO + SeedSelect | 8 |", "The paper's claim", "## Downstream classifier",
                     "| examples only | 6 |", "| random + SeedSelect | 14 |"):
        assert fragment in report, fragment
    assert "Incomplete run" not in report
    assert (out / "rare_concepts_samples.png").stat().st_size > 0
    assert (out / "rare_concepts_class0.png").stat().st_size > 0
    res = json.loads((out / "rare_concepts.json").read_text())
    assert set(res["rows"]) == {"random", "random+ss", "nao", "nao+ss", "normalized+ss"}
    assert res["missing"] == []
    for row in res["rows"].values():
        assert row["n"] == 8 and row["classes"] == [0, 1]
        lo, hi = row["accuracy"][1:]
        assert lo <= row["accuracy"][0] <= hi
    # NFE: 4 steps; random = one render; random+ss = 3 evaluated iterates of which 2 stepped
    # (forward 4, backward 2 x 4 each) + the render; the others add the shared inversion.
    nfe = {m: r["nfe_per_image"] for m, r in res["rows"].items()}
    assert nfe["random"] == 4
    assert nfe["random+ss"] == 3 * 4 + 2 * 8 + 4
    assert nfe["nao+ss"] - nfe["nao"] == 2 * 4 + 8
    assert nfe["nao"] > 4
    cells = sorted(p.name for p in cache.glob("cell-*.json"))
    assert len(cells) == 10 and "cell-random_ss-c1.json" in cells
    row = json.loads((cache / "cell-nao-c0.json").read_text())
    assert row["jobs"] == 2 and row["nfe_start_total"] == row["nfe_start_reported"]
    capfd.readouterr()
    # A rerun measures nothing: every cell and every downstream run comes from the cache.
    assert _main(mod, args) == 0
    err = capfd.readouterr().err
    assert "measuring" not in err and "downstream" not in err, err
    assert (out / "rare_concepts.md").read_text() == report


def test_bad_arguments_exit_2(tmp_path, capsys):
    mod = _module()
    base = ["--quick", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    for extra in (["--classes", "7"], ["--classes", "x"], ["--methods", "magic"],
                  ["--jobs", "0"]):
        assert _main(mod, base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and err.startswith("error"), err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "protocol.json").write_text("{}")  # a cache of another protocol
    assert _main(mod, base) == 2
    assert "another protocol" in capsys.readouterr().err


def test_statistics_against_brute_force():
    mod = _module()
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 3))
    pairs = [np.linalg.norm(f[i] - f[j]) for i, j in itertools.permutations(range(6), 2)]
    assert abs(mod.mean_pairwise_distance(f) - np.mean(pairs)) < 1e-12
    # Delete-one jackknife of the mean is the usual standard error s / sqrt(n).
    x = rng.normal(size=(30, 1))
    est, se = mod.jackknife(lambda v: float(v.mean()), x)
    assert abs(est - x.mean()) < 1e-12 and abs(se - x.std(ddof=1) / np.sqrt(30)) < 1e-12
    # Newcombe (1998), Table II: 56/70 - 48/80 -> 0.0524 to 0.3339; 9/10 - 3/10 -> 0.1705
    # to 0.8090 (method 10).
    d = mod.newcombe_difference(56, 70, 48, 80)
    assert abs(d[0] - 0.2) < 1e-12 and abs(d[1] - 0.0524) < 1e-4 and abs(d[2] - 0.3339) < 1e-4
    d = mod.newcombe_difference(9, 10, 3, 10)
    assert abs(d[1] - 0.1705) < 1e-4 and abs(d[2] - 0.8090) < 1e-4
    est, lo, hi = mod.combine([(1.0, 0.1), (3.0, 0.2)])
    assert est == 2.0 and abs((hi - lo) / 2 - 1.96 * np.sqrt(0.05) / 2) < 1e-12


def test_nfe_counter_counts_rows_and_backward_twice():
    mod = _module()
    net = torch.nn.Linear(4, 4)
    counter = mod.NFECounter(net)
    x = torch.randn(3, 4)
    with torch.no_grad():
        net(x)
    assert (counter.forward, counter.backward, counter.total) == (3, 0, 3)
    counter.reset()
    y = x.clone().requires_grad_(True)
    net(net(y)).sum().backward()  # two evaluations of 3 rows, both backpropagated
    assert (counter.forward, counter.backward, counter.total) == (6, 6, 18)
    counter.close()
    net(x)
    assert counter.forward == 6


def test_cell_claim_lock(tmp_path):
    mod = _module()
    assert mod.claim(tmp_path, "cell-a")  # free: taken
    assert mod.claim(tmp_path, "cell-a")  # held by this process
    (tmp_path / "cell-b.lock").write_text(str(os.getppid()))  # held by a live process
    assert not mod.claim(tmp_path, "cell-b")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "cell-c.lock").write_text(dead)  # left by a process that is gone
    assert mod.claim(tmp_path, "cell-c")
    assert (tmp_path / "cell-c.lock").read_text() == str(os.getpid())
