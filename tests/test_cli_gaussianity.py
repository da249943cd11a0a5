"""CLI: `latentgeo stats` and `latentgeo reproject`."""

from __future__ import annotations

import json

import torch

from latentgeo.io import load_latent, save_latent
from tests.conftest import assert_one_line_error
from tests.test_gaussianity import checkerboard


def _files(tmp_path):
    good = save_latent(tmp_path / "in" / "good.pt",
                       torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(0)))
    bad = save_latent(tmp_path / "in" / "board.safetensors", checkerboard((4, 32, 32)),
                      {"model": "toy"})
    return good, bad


def test_stats_json_table_and_plot(cli, tmp_path):
    good, _ = _files(tmp_path)
    out = json.loads(cli("stats", tmp_path / "in", "--json").stdout)
    verdict = {d["file"].rsplit("/", 1)[-1]: d["passed"] for d in out}
    assert verdict == {"board.safetensors": False, "good.pt": True}
    assert {"norm", "spectral", "bands", "moments"} <= {t["name"] for t in out[0]["tests"]}
    table = cli("stats", good, "--plot", tmp_path / "g.png").stdout
    assert "PASS" in table and "spectral" in table
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert_one_line_error(cli("stats", good, "--plot", tmp_path / "g.png", expect=None),
                          "--force")
    assert_one_line_error(cli("stats", tmp_path / "missing.pt", expect=None), "missing.pt")


def test_reproject_writes_passing_latents(cli, tmp_path):
    good, bad = _files(tmp_path)
    out = json.loads(cli("reproject", good, bad, "-o", tmp_path / "out/", "--json").stdout)
    assert [d["passed_after"] for d in out] == [True, True]
    assert out[0]["steps"] == 0 and out[0]["distance"] == 0
    z, meta = load_latent(tmp_path / "out" / "board.safetensors")
    assert z.shape == (4, 32, 32) and meta["method"] == "reproject:fast" and meta["model"] == "toy"
    assert "pass" in cli("stats", tmp_path / "out" / "board.safetensors").stdout.lower()
    assert_one_line_error(cli("reproject", good, "-o", tmp_path / "out/", expect=None),
                          "--force")
    assert_one_line_error(cli("reproject", good, "-o", tmp_path / "x/", "--method", "nope",
                              expect=None), "nope")
