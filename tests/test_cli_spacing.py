"""`latentgeo interpolate --spacing`: choices from the registry, default frames, one-line errors."""

from __future__ import annotations

import torch

from latentgeo.interpolation import nao
from latentgeo.io import load_latent, save_latent
from latentgeo.spacings import DEFAULT_SPACING, SPACINGS
from tests.conftest import assert_one_line_error


def _pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = 0.8 * torch.randn(2, 6, 6, generator=g), 1.2 * torch.randn(2, 6, 6, generator=g)
    save_latent(tmp_path / "a.pt", a)
    save_latent(tmp_path / "b.pt", b)
    return a, b


def test_spacing_choices_and_default(cli, tmp_path):
    a, b = _pair(tmp_path)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    cli("interpolate", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "d.pt",
        "--points", "5")
    default, _ = load_latent(tmp_path / "d.pt")
    torch.testing.assert_close(default, nao(a, b, t, spacing=DEFAULT_SPACING))
    for name in SPACINGS:
        out = tmp_path / f"{name}.pt"
        cli("interpolate", tmp_path / "a.pt", tmp_path / "b.pt", "-o", out, "--points", "5",
            "--spacing", name)
        path, _ = load_latent(out)
        torch.testing.assert_close(path, nao(a, b, t, spacing=name))
    r = cli("interpolate", "--help")
    for name in SPACINGS:
        assert name in r.stdout


def test_unknown_spacing_is_one_line_error(cli, tmp_path):
    _pair(tmp_path)
    r = cli("interpolate", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "p.pt",
            "--spacing", "bogus", expect=None)
    assert_one_line_error(r, "bogus", ", ".join(SPACINGS))
    assert not (tmp_path / "p.pt").exists()
