"""What only a real process shows: startup cost of the CLI (no torch for help or usage errors).

Kept to a few subprocess runs; everything else is tested in-process with CliRunner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


_HELP_PROBE = """
import json, sys
from typer.testing import CliRunner
from latentgeo.cli import COMMANDS, app
runner = CliRunner()
runs = [[]] + [[name, "--help"] for name, _, _ in COMMANDS] + [["--help"], ["-h"]]
runs += [[name, "--no-such-flag"] for name, _, _ in COMMANDS]
codes = {" ".join(args): runner.invoke(app, args).exit_code for args in runs}
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules,
                  "heavy": sorted(m for m in ("numpy", "diffusers", "matplotlib", "PIL",
                                               "safetensors", "scipy") if m in sys.modules)}))
"""


def test_help_and_usage_errors_import_no_torch():
    """`latentgeo --help`, every command's --help and every usage error run without torch (or
    numpy, diffusers, matplotlib, Pillow, scipy) ever being imported."""
    r = _python(_HELP_PROBE)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["torch"] and out["heavy"] == [], out
    for args, code in out["codes"].items():
        assert code == (2 if "--no-such-flag" in args else 0), (args, code)


def test_entry_point_help_in_a_fresh_process():
    """The console script's path: python -m latentgeo --help, one usage error, no torch."""
    code = ("import runpy, sys\n"
            "sys.argv = ['latentgeo'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('latentgeo', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules, file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    help_run = subprocess.run([sys.executable, "-c", code, "interpolate", "--help"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert "--points" in help_run.stdout and "EXIT 0 False" in help_run.stderr
    bad = subprocess.run([sys.executable, "-c", code, "interpolate", "a.pt", "b.pt", "-o",
                          "p.pt", "--points", "1"], capture_output=True, text=True, env=env,
                         timeout=120)
    lines = bad.stderr.splitlines()
    assert lines[0].startswith("error: ") and "--points" in lines[0], bad.stderr
    assert lines[1].startswith("Usage: latentgeo interpolate"), bad.stderr
    assert lines[2] == "EXIT 2 False" and len(lines) == 3, bad.stderr
