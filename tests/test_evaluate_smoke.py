"""Smoke test of the evaluation driver (benchmarks/evaluate.py --quick): it runs end to end on
the bundled model and writes its tables and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_quick(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evaluate.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "README.md").read_text()
    for section in ("## Centroids", "## Interpolation", "## Inversion", "## Gaussianity"):
        assert section in report
    for png in ("centroid_grid.png", "interpolation_grid.png", "norm_profiles.png"):
        assert (out / png).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    methods = [row[0] for row in results["centroids"]]
    assert methods == ["euclidean", "normalized", "cog", "spherical", "nao", "nao+reproject"]
    # Every accuracy cell carries its interval: "0.50 [0.24, 0.76]".
    assert all("[" in cell for row in results["centroids"] for cell in row[1:3])
