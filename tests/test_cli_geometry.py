"""`latentgeo interpolate` and `latentgeo centroid`: files, JSON, tables, one-line errors."""

from __future__ import annotations

import json

import torch

from latentgeo.io import load_latent, load_latent_set, save_latent
from tests.conftest import assert_one_line_error


def _seeds(tmp_path, n=4, shape=(2, 6, 6)):
    """n seeds with norms spread around the chi shell."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        p = tmp_path / "seeds" / f"s{i}.pt"
        save_latent(p, torch.randn(shape, generator=g) * (0.9 + 0.1 * i))
        paths.append(p)
    return paths


def test_interpolate_file_dir_and_json(cli, tmp_path):
    a, b, *_ = _seeds(tmp_path)
    r = cli("interpolate", a, b, "-o", tmp_path / "path.pt", "--points", "5", "--json")
    out = json.loads(r.stdout)
    assert out["method"] == "nao" and len(out["norms"]) == 5
    assert out["nao_distance"] <= out["nao_length"] * (1 + 1e-9)
    path, meta = load_latent(tmp_path / "path.pt")
    assert path.shape == (5, 2, 6, 6) and meta["method"] == "nao"
    xa, _ = load_latent(a)
    assert torch.equal(path[0], xa)
    cli("interpolate", a, b, "-o", tmp_path / "steps/", "--method", "slerp", "--points", "3")
    x, names = load_latent_set([tmp_path / "steps"])
    assert x.shape == (3, 2, 6, 6) and names == ["step000", "step001", "step002"]


def test_interpolate_all_methods_table(cli, tmp_path):
    a, b, *_ = _seeds(tmp_path)
    r = cli("interpolate", a, b, "-o", tmp_path / "p.pt", "--points", "3", "--all-methods",
            "--max-iters", "2")
    for name in ("lerp", "slerp", "nlerp", "cog", "nao", "nao-reference"):
        assert name in r.stdout


def test_interpolate_errors(cli, tmp_path):
    a, b, *_ = _seeds(tmp_path)
    r = cli("interpolate", a, b, "-o", tmp_path / "p.pt", "--method", "bogus", expect=None)
    assert_one_line_error(r, "bogus", "--method", "nao-reference")
    other = tmp_path / "other.pt"
    save_latent(other, torch.randn(3, 3))
    assert_one_line_error(cli("interpolate", a, other, "-o", tmp_path / "p.pt", expect=None),
                          "shape")
    cli("interpolate", a, b, "-o", tmp_path / "p.pt")
    assert_one_line_error(cli("interpolate", a, b, "-o", tmp_path / "p.pt", expect=None),
                          "--force")
    zero = tmp_path / "zero.pt"
    save_latent(zero, torch.zeros(2, 6, 6))
    assert_one_line_error(cli("interpolate", a, zero, "-o", tmp_path / "q.pt", expect=None),
                          "zero latent")


def test_centroid_dir_batch_weights_json(cli, tmp_path):
    paths = _seeds(tmp_path)
    r = cli("centroid", tmp_path / "seeds", "-o", tmp_path / "c.pt", "--json")
    out = json.loads(r.stdout)
    assert out["n"] == 4 and set(out["distances"]) == {"s0", "s1", "s2", "s3"}
    c, meta = load_latent(tmp_path / "c.pt")
    assert c.shape == (2, 6, 6) and meta["method"] == "nao"
    batch = tmp_path / "batch.pt"
    save_latent(batch, torch.stack([load_latent(p)[0] for p in paths]))
    r = cli("centroid", batch, "-o", tmp_path / "c2.pt", "--power", "2", "--weights",
            "1,2,1,1", "--json")
    assert json.loads(r.stdout)["power"] == 2
    r = cli("centroid", *paths[:3], "-o", tmp_path / "c3.pt", "--all-methods", "--max-iters",
            "2")
    for name in ("euclidean", "normalized", "cog", "spherical", "nao", "nao-reference"):
        assert name in r.stdout


def test_centroid_errors(cli, tmp_path):
    paths = _seeds(tmp_path)
    r = cli("centroid", *paths, "-o", tmp_path / "c.pt", "--method", "median", expect=None)
    assert_one_line_error(r, "median", "euclidean, normalized, cog, spherical, nao")
    assert_one_line_error(cli("centroid", *paths, "-o", tmp_path / "c.pt", "--weights", "1,2",
                              expect=None), "--weights")
    assert_one_line_error(cli("centroid", *paths, "-o", tmp_path / "c.pt", "--weights",
                              "1,x,1,1", expect=None), "--weights")
    assert_one_line_error(cli("centroid", *paths, "-o", tmp_path / "c.pt", "--power", "3",
                              expect=None), "--power")
    assert_one_line_error(cli("centroid", tmp_path / "missing", "-o", tmp_path / "c.pt",
                              expect=None), "missing")
