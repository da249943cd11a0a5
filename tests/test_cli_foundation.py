"""The CLI's contract: help, version, one-line errors with exit 2, reproducible `sample`."""

from __future__ import annotations

import pickle

import torch
import typer
from typer.testing import CliRunner

from latentgeo import __version__
from latentgeo.cli.common import guard
from latentgeo.errors import InputError
from latentgeo.io import load_latent, load_latent_set
from tests.conftest import assert_one_line_error
from tests.test_io import _Evil


def test_version_and_help(cli):
    assert cli("--version").stdout.strip() == f"latentgeo {__version__}"
    out = cli("--help").stdout
    assert "sample" in out


def test_sample_reproducible(cli, tmp_path):
    cli("sample", "--shape", "4,8,8", "-n", "3", "--seed", "7", "-o", tmp_path / "a.pt")
    cli("sample", "--shape", "4,8,8", "-n", "3", "--seed", "7", "-o", tmp_path / "b.pt")
    a, meta = load_latent(tmp_path / "a.pt")
    b, _ = load_latent(tmp_path / "b.pt")
    assert a.shape == (3, 4, 8, 8) and torch.equal(a, b)
    assert meta["seed"] == "7"
    cli("sample", "--like", "bundled", "-n", "4", "-o", tmp_path / "dir/", "--json")
    x, names = load_latent_set([tmp_path / "dir"])
    assert x.shape == (4, 1, 32, 32) and len(names) == 4


def test_sample_refuses_overwrite(cli, tmp_path):
    cli("sample", "--shape", "3", "-o", tmp_path / "a.pt")
    assert_one_line_error(cli("sample", "--shape", "3", "-o", tmp_path / "a.pt", expect=None),
                          "a.pt", "--force")
    cli("sample", "--shape", "3", "-o", tmp_path / "a.pt", "--force")


def test_bad_options_exit_2(cli):
    assert_one_line_error(cli("sample", "--shape", "4,x", "-o", "z.pt", expect=None), "--shape")
    assert_one_line_error(cli("sample", "--like", "nope", "-o", "z.pt", expect=None), "nope")
    # Typer usage errors (missing required option) also exit 2.
    assert cli("sample", expect=None).exit_code == 2


def _loader_app():
    """A one-command app that reads a latent through the same guard as every real command."""
    app = typer.Typer()

    @app.command()
    def read(path: str) -> None:
        load_latent(path)

    app.command("noop")(lambda: None)  # two commands, so `read` is a subcommand
    app.registered_commands[0].callback = guard(read)
    return app


def test_malicious_pickle_refused_with_one_line(tmp_path):
    target = tmp_path / "pwned.txt"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Evil(str(target)), f)
    result = CliRunner().invoke(_loader_app(), ["read", str(tmp_path / "evil.pt")])
    assert_one_line_error(result, "evil.pt")
    assert not target.exists()


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTGEO_DEBUG", "1")
    result = CliRunner().invoke(_loader_app(), ["read", str(tmp_path / "missing.pt")])
    assert result.exit_code != 0 and isinstance(result.exception, InputError)
