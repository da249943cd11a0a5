"""Batch work at scale on the bundled model (issue 16's acceptance): torchrun and accelerate
launch give the same files as one process; a run killed by SIGINT, SIGTERM and SIGKILL resumes
without recomputing finished items and leaves no temporary files; --shard 0/3, 1/3, 2/3
together equal the unsharded run; a re-run with other options is refused. Tiny step counts and
few items keep it to about a minute on a 2-core CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentgeo
from latentgeo.io import load_latent, save_latent
from latentgeo.jobs import merge_manifests, read_provenance
from tests.conftest import assert_one_line_error

HERE = Path(__file__).resolve().parent
SRC = Path(latentgeo.__file__).resolve().parents[1]
N_SEEDS = 7
RENDER = ["--steps", "3", "--batch-size", "2"]
INVERT = ["--steps", "3", "--fixed-point", "1", "--batch-size", "2"]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("ACCELERATE")}
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE.parent), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no launcher: seeds (one batch file), their renders, the renders inverted."""
    from typer.testing import CliRunner

    from latentgeo.cli import app

    root = tmp_path_factory.mktemp("scale")
    z = torch.randn((N_SEEDS, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    save_latent(root / "seeds.safetensors", z)
    runner = CliRunner()
    r = runner.invoke(app, ["render", str(root / "seeds.safetensors"), "-o",
                            str(root / "ref-img"), *RENDER])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["invert", str(root / "ref-img"), "-o", f"{root / 'ref-seeds'}/",
                            *INVERT])
    assert r.exit_code == 0, r.stderr
    return root


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


def assert_same_images(a: Path, b: Path) -> None:
    pa, pb = pngs(a), pngs(b)
    assert sorted(pa) == sorted(pb) and len(pa) == N_SEEDS  # same names, none missing
    for name in pa:
        assert np.abs(pa[name] - pb[name]).max() <= 1, name  # within one grey level


def assert_same_seeds(a: Path, b: Path) -> None:
    na = sorted(p.name for p in a.glob("*.safetensors"))
    assert na == sorted(p.name for p in b.glob("*.safetensors")) and len(na) == N_SEEDS
    for name in na:
        torch.testing.assert_close(load_latent(a / name)[0], load_latent(b / name)[0],
                                   atol=1e-5, rtol=0)


def no_temp_files(*folders: Path) -> None:
    for f in folders:
        left = [p.name for p in f.iterdir() if p.name.startswith(".")]
        assert left == [], left


def launched(launcher: list[str], root: Path, tag: str) -> subprocess.CompletedProcess:
    """Each rank runs ``latentgeo render`` then ``latentgeo invert`` (tests/scale_worker.py)."""
    cmd = [*launcher, str(HERE / "scale_worker.py"),
           "render", str(root / "seeds.safetensors"), "-o", str(root / f"{tag}-img"), *RENDER,
           "--", "invert", str(root / "ref-img"), "-o", f"{root / f'{tag}-seeds'}/", *INVERT]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def check_launched(root: Path, tag: str) -> None:
    img, seeds = root / f"{tag}-img", root / f"{tag}-seeds"
    assert_same_images(img, root / "ref-img")
    assert_same_seeds(seeds, root / "ref-seeds")
    no_temp_files(img, seeds)
    for folder in (img, seeds):  # two shards, each complete, every input once
        s = merge_manifests(folder)
        assert s.ok and [(st.index, st.count) for st in s.shards] == [(0, 2), (1, 2)]
        assert len(s.records) == N_SEEDS and sum(st.done for st in s.shards) == N_SEEDS


def test_torchrun_two_processes_equal_one(reference):
    r = launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(free_port())], reference, "torchrun")
    assert "[shard 1/2]" in r.stderr and "[shard 0/2]" in r.stderr  # per-rank log lines
    check_launched(reference, "torchrun")


def test_accelerate_two_processes_equal_one(reference):
    pytest.importorskip("accelerate")
    # On a machine without GPUs, accelerate starts several processes only in its multi-GPU
    # mode (which runs torch's launcher; each rank then uses the CPU).
    launched([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())],
             reference, "accelerate")
    check_launched(reference, "accelerate")


def test_shards_together_equal_the_unsharded_run(cli, reference):
    out_img, out_seeds = reference / "shard-img", reference / "shard-seeds"
    for i in range(3):
        cli("render", reference / "seeds.safetensors", "-o", out_img, *RENDER,
            "--shard", f"{i}/3")
        cli("invert", reference / "ref-img", "-o", f"{out_seeds}/", *INVERT, "--shard", f"{i}/3")
    assert_same_images(out_img, reference / "ref-img")
    assert_same_seeds(out_seeds, reference / "ref-seeds")
    for folder in (out_img, out_seeds):
        s = merge_manifests(folder)
        assert s.ok and [st.items for st in s.shards] == [3, 2, 2]
    r = cli("manifest", out_img, "--json")
    assert json.loads(r.stdout)["ok"] is True


def test_rerun_skips_and_other_options_are_refused(cli, reference):
    img, seeds = reference / "ref-img", reference / "ref-seeds"
    stamps = {p.name: p.stat().st_mtime_ns for p in [*img.iterdir(), *seeds.iterdir()]
              if p.suffix != ".jsonl"}
    r = cli("render", reference / "seeds.safetensors", "-o", img, *RENDER, "--json")
    assert len(json.loads(r.stdout)["resumed"]) == N_SEEDS
    r = cli("render", reference / "seeds.safetensors", "-o", img, "--steps", "4", expect=2)
    assert_one_line_error(r, "seeds_000.png", "steps 3 -> 4", "--force")
    r = cli("invert", img, "-o", f"{seeds}/", *INVERT[:2], "--fixed-point", "2", expect=2)
    assert_one_line_error(r, "seeds_000.safetensors", "fixed_point_iters 1 -> 2", "--force")
    assert {p.name: p.stat().st_mtime_ns for p in [*img.iterdir(), *seeds.iterdir()]
            if p.suffix != ".jsonl"} == stamps
    assert read_provenance(img / "seeds_000.png").options["steps"] == 3


def _render_until(args: list[str], out: Path, new: int, sig: int) -> int:
    """Start a render, wait until it has written ``new`` more PNGs (so it is inside its job
    loop, signal handlers installed), send ``sig``; its exit status."""
    at_least = len(list(out.glob("*.png"))) + new if out.is_dir() else new
    proc = subprocess.Popen([sys.executable, "-m", "latentgeo", *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and len(list(out.glob("*.png"))) >= at_least:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()[-2000:]}"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc.returncode


def test_killed_runs_resume_without_recomputing(cli, reference, tmp_path):
    n = 24
    z = torch.randn((n, 1, 32, 32), generator=torch.Generator().manual_seed(5))
    save_latent(tmp_path / "many.safetensors", z)
    out = tmp_path / "img"
    args = ["render", str(tmp_path / "many.safetensors"), "-o", str(out), "--steps", "6",
            "--batch-size", "1"]
    seen: dict[str, tuple[int, int]] = {}
    for sig, expected in [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                          (signal.SIGKILL, -signal.SIGKILL)]:
        code = _render_until(args, out, 2, sig)
        assert code == expected, (sig, code)
        files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
        assert len(files) < n
        for name, stamp in seen.items():  # finished images are never redone
            assert files[name] == stamp, name
        seen = files
        if sig != signal.SIGKILL:
            no_temp_files(out)  # Ctrl-C and SIGTERM clean up at once
        r = cli("manifest", out, expect=2)
        assert "incomplete" in r.stderr
    # a temp file left by a writer that died (as SIGKILL can leave one) goes on the next run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from latentgeo.jobs import temp_path

    temp_path(out / "many_023.png", pid=dead.pid).write_bytes(b"partial")
    r = cli(*args[:-2], "--batch-size", "4", "--json")
    info = json.loads(r.stdout)
    assert len(info["resumed"]) == len(seen) and len(info["images"]) == n
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert len(files) == n and all(files[k] == v for k, v in seen.items())
    no_temp_files(out)
    cli("manifest", out)  # complete, nothing failed: exit 0
    # and the result equals an uninterrupted run
    full = tmp_path / "full"
    cli(*args[:3], str(full), *args[4:])
    pa, pb = pngs(out), pngs(full)
    assert sorted(pa) == sorted(pb)
    assert all(np.abs(pa[k] - pb[k]).max() <= 1 for k in pa)


def test_optimize_streams_shards_and_resumes(cli, tmp_path):
    """optimize into a folder runs on the job layer: shards and one-seed chunks give what one
    batch gives (the randomised regulariser draws per iteration, not per position), and a
    re-run skips what is done."""
    from tests.tiny_sd import TINY_PIXEL_LATENT, tiny_pixel_path

    save_latent(tmp_path / "z.safetensors",
                torch.randn((3, *TINY_PIXEL_LATENT), generator=torch.Generator().manual_seed(2)))
    base = ["optimize", tmp_path / "z.safetensors", "--reward", "class:3", "--model",
            str(tiny_pixel_path()), "--steps", "1", "--iters", "2", "--reg", "mpgr"]
    cli(*base, "-o", f"{tmp_path / 'one'}/", "--batch-size", "3")
    for i in range(2):
        cli(*base, "-o", f"{tmp_path / 'sharded'}/", "--batch-size", "1", "--shard", f"{i}/2")
    names = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(names) == 3
    for n in names:
        torch.testing.assert_close(load_latent(tmp_path / "one" / n)[0],
                                   load_latent(tmp_path / "sharded" / n)[0], atol=1e-5, rtol=0)
    assert merge_manifests(tmp_path / "sharded").ok
    r = cli(*base, "-o", f"{tmp_path / 'one'}/", "--json")
    assert len(json.loads(r.stdout)["resumed"]) == 3
    r = cli(*base[:-2], "--reg", "dno", "-o", f"{tmp_path / 'one'}/", expect=2)
    assert_one_line_error(r, "exists from a different run", "--force")
