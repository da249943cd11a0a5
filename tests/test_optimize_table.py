"""Smoke test of the reward-hacking table (benchmarks/optimize_table.py --quick): it runs end to
end on the bundled model, writes the report, the JSON and the figures, and resumes from its
cached rows; plus the KID estimator and the verdict rule."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("optimize_table",
                                                  ROOT / "benchmarks" / "optimize_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["optimize_table"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_optimize_table_quick_and_resume(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "optimize_table.py"), "--quick",
           "--out", str(out), "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "optimize.md").read_text()
    for fragment in ("| regulariser | lambda | target success | held-out success",
                     "(not optimised)", "| none |", "| mpgr | 1 |", "## Verdict",
                     "## Hacking curve"):
        assert fragment in report, fragment
    for png in ("optimize_hacking.png", "optimize_samples.png"):
        assert (out / png).stat().st_size > 0
    results = json.loads((out / "optimize.json").read_text())
    assert [(r["reg"], r["lam"]) for r in results["rows"]] == [("none", 0.0), ("mpgr", 1.0)]
    assert all(r["n"] == 3 and len(r["target_success"]) == 3 for r in results["rows"])
    # Every row is cached as soon as it is done (a rerun resumes from these).
    assert sorted(p.name for p in work.glob("*.json")) == ["mpgr_1.json", "none_0.json",
                                                           "protocol.json"]
    mod = _module()
    row = mod.load_row(work, "mpgr_1")
    assert row["reg"] == "mpgr" and row["features"].shape[0] == 3
    assert mod.load_row(work, "kl_1") is None


def test_kid_is_unbiased_mmd_and_pick_rule():
    mod = _module()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(300, 4))
    assert abs(mod.kid(a, b)) < 0.05  # same law: unbiased estimate near 0
    assert mod.kid(a + 1.0, b) > 0.5
    # Brute-force MMD^2 with the cubic kernel on a tiny case.
    x, y = rng.normal(size=(3, 2)), rng.normal(size=(4, 2))
    k = lambda u, v: (u @ v / 2 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(3) for j in range(3) if i != j) / 6
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(3) for j in range(4)) / 12
    assert abs(mod.kid(x, y) - (xx + yy - 2 * xy)) < 1e-9

    def row(reg, lam, target, held):
        return {"reg": reg, "lam": lam, "target_success": [target, 0, 1],
                "heldout_success": [held, 0, 1], "heldout_logp": [0, 0, 0]}

    rows = [row("none", 0, 1.0, 0.7), row("a", 0.1, 0.95, 0.8), row("a", 1, 0.5, 0.9),
            row("b", 0.1, 0.99, 0.6), row("b", 1, 0.88, 0.75)]
    chosen, best = mod.pick(rows)
    assert [(c["reg"], c["lam"]) for c in chosen] == [("a", 0.1), ("b", 1)]
    assert (best["reg"], best["lam"]) == ("a", 0.1)
