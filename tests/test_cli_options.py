"""One options module, one meaning per flag: the CLI's conventions, checked over every command.

A command added later (``optimize``, ``align``, ...) is checked by the same tests as soon as it
is registered in ``latentgeo.cli.COMMANDS``.
"""

from __future__ import annotations

import json
import typing

import pytest
import torch
import typer

from latentgeo.cli import COMMANDS, app, names
from latentgeo.io import LATENT_SUFFIXES, save_latent
from tests.conftest import assert_one_line_error
from tests.tiny_sd import TINY_PIXEL_LATENT, tiny_pixel_path


def _commands() -> dict[str, typing.Any]:
    return dict(typer.main.get_command(app).commands)


def _options(command) -> dict[str, typing.Any]:
    """Every flag of a command (long and short names) -> its parameter."""
    return {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)
            if opt.startswith("-")}


def _choices(param) -> tuple:
    """The values of a ``Literal`` option (empty for any other type)."""
    ann = param.type_descriptor.annotation
    return typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else ()


def test_names_table_equals_the_registries():
    from latentgeo.centroids import CENTROIDS
    from latentgeo.interpolation import INTERPOLATORS
    from latentgeo.reprojection import METHODS

    assert names.INTERPOLATION_METHODS == tuple(INTERPOLATORS)
    assert names.CENTROID_METHODS == tuple(CENTROIDS)
    assert names.REPROJECTION_METHODS == tuple(METHODS)
    assert tuple(f".{f}" for f in names.LATENT_FORMATS) == LATENT_SUFFIXES[::-1]


def test_spacings_are_the_ones_the_library_takes():
    from latentgeo.errors import InputError
    from latentgeo.interpolation import nao

    a, b = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 1, 3)
    for s in names.SPACINGS:
        assert torch.isfinite(nao(a, b, t, spacing=s)).all()
    with pytest.raises((InputError, ValueError)):
        nao(a, b, t, spacing="bogus")


def test_every_registered_command_is_in_the_app():
    assert sorted(_commands()) == sorted(name for name, _, _ in COMMANDS)


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_one_meaning_per_flag(name):
    """--steps is diffusion steps, -m is --method, --format is the latent format, ..."""
    command = _commands()[name]
    opts = _options(command)
    assert "--safetensors" not in opts and "--render-steps" not in opts
    if "--steps" in opts:
        assert "diffusion" in (opts["--steps"].help or "").lower(), name
    if "-m" in opts:
        assert "--method" in opts["-m"].opts, name
    if "--method" in opts:
        assert "-m" in opts["--method"].opts, name
        assert _choices(opts["--method"]), name  # choices from the names table
    if "--format" in opts:
        assert _choices(opts["--format"]) == names.LATENT_FORMATS, name
    if "-o" in opts:
        assert "--output" in opts["-o"].opts, name
    if "-n" in opts:
        assert "--num" in opts["-n"].opts, name
    for flag in ("--json", "--force"):
        if flag in opts:
            assert opts[flag].is_flag, (name, flag)


def test_method_choices_come_from_the_registries():
    cmds = _commands()
    choices = {name: _choices(_options(cmds[name])["--method"])
               for name in ("interpolate", "centroid", "reproject")}
    assert choices == {"interpolate": names.INTERPOLATION_METHODS,
                       "centroid": names.CENTROID_METHODS,
                       "reproject": names.REPROJECTION_METHODS}


def test_usage_errors_are_one_error_line_and_one_usage_line(cli):
    for args, fragment in [(("sample", "--bogus"), "--bogus"),
                           (("sample",), "--output"),
                           (("centroid", "a.pt", "-o", "c.pt", "-m", "median"),
                            "choose from euclidean, normalized"),
                           (("render", "x.pt", "-o", "out", "--guidance", "nan"), "finite"),
                           (("render", "x.pt", "-o", "out", "--steps", "0"), "--steps"),
                           (("nosuch",), "nosuch")]:
        r = cli(*args, expect=2)
        assert_one_line_error(r, fragment)
        lines = r.stderr.splitlines()
        assert len(lines) == 2 and lines[1].startswith("Usage: latentgeo"), r.stderr
        assert r.stdout == ""


def test_render_json_reports_the_guidance_applied(cli, tmp_path):
    """Unconditional render: no guidance is applied, whatever the model's default or --guidance
    says; with a class the model's default (or --guidance) is reported."""
    model = str(tiny_pixel_path())
    z = torch.randn((1, *TINY_PIXEL_LATENT), generator=torch.Generator().manual_seed(0))
    save_latent(tmp_path / "z.pt", z)
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "u", "--model", model, "--steps", "1",
            "--guidance", "3", "--json")
    assert json.loads(r.stdout)["guidance"] == 1.0
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "c", "--model", model, "--steps", "1",
            "--class", "2", "--guidance", "3", "--json")
    assert json.loads(r.stdout)["guidance"] == 3.0


def test_library_messages_name_no_cli_flags():
    """The library names the problem (and its own arguments); only latentgeo.cli names flags
    such as --force or --steps (STYLE.md, issue 15)."""
    import ast
    import re
    from pathlib import Path

    import latentgeo

    root = Path(latentgeo.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if "cli" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for const in ast.walk(node.exc):
                    if (isinstance(const, ast.Constant) and isinstance(const.value, str)
                            and re.search(r"(^|[\s(])--[a-z]", const.value)):
                        offenders.append(f"{path.name}:{node.lineno}: {const.value}")
    assert not offenders, offenders


def test_guard_lets_typer_control_flow_through():
    """typer.Exit and usage errors raised inside a command are not reported as bugs."""
    from typer.testing import CliRunner

    from latentgeo.cli.common import LatentgeoGroup, guard

    app2 = typer.Typer(cls=LatentgeoGroup)

    def quits(code: int = 0) -> None:
        raise typer.Exit(code)

    def bad() -> None:
        raise typer.BadParameter("no good")

    app2.command("quits")(guard(quits))
    app2.command("bad")(guard(bad))
    assert CliRunner().invoke(app2, ["quits", "--code", "3"]).exit_code == 3
    r = CliRunner().invoke(app2, ["bad"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "bug" not in r.stderr


def test_invert_json_reports_the_guidance_applied(cli, tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(tmp_path / "d.png")
    common = ["invert", tmp_path / "d.png", "--model", str(tiny_pixel_path()), "--steps", "1",
              "--fixed-point", "0", "--guidance", "3", "--json"]
    assert json.loads(cli(*common, "-o", f"{tmp_path / 'u'}/").stdout)["guidance"] == 1.0
    r = cli(*common, "-o", f"{tmp_path / 'c'}/", "--class", "2")
    assert json.loads(r.stdout)["guidance"] == 3.0
