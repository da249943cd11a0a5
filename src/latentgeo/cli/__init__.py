"""The ``latentgeo`` command line: a thin Typer layer over the Python API.

Each subcommand lives in its own module and is registered in ``COMMANDS`` below; its options
come from :mod:`latentgeo.cli.options` (read its header before adding a command). Command modules
import torch and every heavy library inside their functions, so ``--help`` and usage errors never
import torch (tested in ``tests/test_processes.py``).
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from latentgeo import __version__
from latentgeo.cli.common import LatentgeoGroup, guard

app = typer.Typer(
    name="latentgeo",
    cls=LatentgeoGroup,
    help="Geometry of diffusion-model latent seeds: interpolate, centroid, invert, reproject.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: (command name, module under latentgeo.cli, function name). Help text is the docstring.
COMMANDS: list[tuple[str, str, str]] = [
    ("sample", "sample", "sample"),
    ("render", "render", "render"),
    ("demo", "demo", "demo"),
    ("invert", "invert", "invert"),
    ("interpolate", "interpolate", "interpolate"),
    ("centroid", "centroid", "centroid"),
    ("stats", "stats", "stats"),
    ("reproject", "reproject", "reproject"),
    ("optimize", "optimize", "optimize"),
    ("manifest", "manifest", "manifest"),
    ("align", "align", "align"),
]

for _name, _module, _func in COMMANDS:
    _fn = getattr(importlib.import_module(f"latentgeo.cli.{_module}"), _func)
    app.command(_name)(guard(_fn))


def _version(value: bool) -> None:
    if value:
        print(f"latentgeo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Geometry of diffusion-model latent seeds: interpolate, centroid, invert, reproject."""


def main() -> None:
    app()
