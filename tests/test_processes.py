"""What only a real process shows: the CLI's startup (no torch for help or usage errors),
signals, two processes racing for one output.

Kept to about ten subprocess runs; everything else is tested in-process with CliRunner
(tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


# -- interruption and concurrency: a writer paused mid-write --------------------------------------
_PAUSED_WRITER = r"""
import os, sys, time
from pathlib import Path
import latentgeo.io as lio
ready, go, at = Path(os.environ["READY"]), Path(os.environ["GO"]), int(os.environ["PAUSE_AT"])
real, calls = lio.save_file, [0]
def paused(tensors, filename, metadata=None):
    calls[0] += 1
    real(tensors, filename, metadata=metadata)  # the temporary file is complete: now wait
    if calls[0] == at:
        # atomically: the test polls for the marker and reads it at once
        part = ready.with_name(ready.name + ".part")
        part.write_text(str(filename))
        os.replace(part, ready)
        deadline = time.time() + 60
        while not go.exists() and time.time() < deadline:
            time.sleep(0.01)
lio.save_file = paused
sys.argv = ["latentgeo", *sys.argv[1:]]
from latentgeo.cli import main
main()
"""


def _start_paused(tmp_path: Path, args: list, pause_at: int):
    """A CLI process whose safetensors writer stops after writing its pause_at-th temporary
    file, until tmp_path/go exists. Returns (process, ready marker, go marker)."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": SRC, "READY": str(ready), "GO": str(go),
           "PAUSE_AT": str(pause_at)}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITER, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the writer never paused"
        time.sleep(0.02)
    return proc, ready, go


def _latent_file(path: Path, seed: int) -> Path:
    import torch

    from latentgeo.io import save_latent

    return save_latent(path, torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_signal_during_a_single_output_write_leaves_nothing(tmp_path, sig, code, word):
    """sample -n 3 into a new folder, stopped while its second file is being written: no
    temporary file, no partial output (the folder the run created is gone too)."""
    out = tmp_path / "seeds"
    proc, ready, _ = _start_paused(tmp_path, ["sample", "--shape", "1,8,8", "-n", "3", "-o",
                                              f"{out}/"], pause_at=2)
    assert Path(ready.read_text()).name.endswith(".tmp")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.splitlines() == [f"error: {word}"], err
    assert not out.exists(), list(out.iterdir())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_batch_keeps_completed_outputs(tmp_path, sig, code):
    """reproject a b -o rp/, stopped while writing b: a's output is complete and valid, b's
    is absent, no temporary file."""
    from latentgeo.io import load_latent

    a = _latent_file(tmp_path / "in" / "a.safetensors", 1)
    b = _latent_file(tmp_path / "in" / "b.safetensors", 2)
    rp = tmp_path / "rp"
    proc, _, _ = _start_paused(tmp_path, ["reproject", a, b, "-o", f"{rp}/", "--max-iters",
                                          "2"], pause_at=2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert sorted(p.name for p in rp.iterdir()) == ["a.safetensors"]
    assert load_latent(rp / "a.safetensors")[0].shape == (1, 8, 8)


def test_two_writers_one_new_path(tmp_path):
    """Writer A passes the existence check, then pauses mid-write; writer B writes the same
    new path and succeeds; A, released, must fail cleanly (exit 2) instead of replacing B's
    file, which stays valid."""
    from latentgeo.io import load_latent

    target = tmp_path / "z.safetensors"
    proc, _, go = _start_paused(tmp_path, ["sample", "--shape", "1,8,8", "--seed", "1", "-o",
                                           target], pause_at=1)
    env = {**os.environ, "PYTHONPATH": SRC}
    b = subprocess.run([sys.executable, "-m", "latentgeo", "sample", "--shape", "1,8,8",
                        "--seed", "2", "-o", str(target)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert b.returncode == 0, b.stderr
    go.write_text("")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.splitlines() == [f"error: {target}: exists (use --force to overwrite)"], err
    z, meta = load_latent(target)
    assert meta["seed"] == "2" and z.shape == (1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []

