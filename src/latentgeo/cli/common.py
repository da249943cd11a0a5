"""What every command shares: error handling, Rich output, progress bars, strict JSON.

Rich lives here and only here; the core reports progress through plain callbacks. Option aliases
live in :mod:`latentgeo.cli.options` (re-exported here for older imports).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from latentgeo.cli.options import (  # noqa: F401  (re-exported)
    ClassLabel,
    Device,
    Dtype,
    Force,
    Guidance,
    Json,
    Model,
    Output,
    Prompt,
    Seed,
    Steps,
)
from latentgeo.errors import LatentgeoError

# Results go to stdout; progress, warnings and errors to stderr, so `--json` output stays clean.
console = Console()
err_console = Console(stderr=True)

#: Iteration cap of the paper's optimisers inside ``--all-methods`` (their default is 10,000).
ALL_METHODS_REFERENCE_ITERS = 300


def one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so a message is one line."""
    return " ".join(str(text).split())


def debug() -> bool:
    """``LATENTGEO_DEBUG=1``: let exceptions through with their traceback."""
    return os.environ.get("LATENTGEO_DEBUG", "") not in ("", "0")


class LatentgeoGroup(TyperGroup):
    """The root command group: Typer's usage errors (unknown option, bad value, missing
    argument) become one ``error:`` line plus one ``Usage:`` hint line on stderr, exit 2,
    instead of Rich's multi-line box."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        except typer.TyperException as e:  # Typer's Click exceptions: usage errors and friends
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
                print(ctx.get_help())  # `latentgeo` alone: the help, as --help would print it
                sys.exit(0)
            print(f"error: {usage_message(e.format_message())}", file=sys.stderr)
            if ctx is not None:
                usage = one_line(ctx.get_usage())
                print(f"{usage}  (see '{ctx.command_path} --help')", file=sys.stderr)
            sys.exit(2 if getattr(e, "exit_code", 1) == 2 else 1)
        sys.exit(rv if isinstance(rv, int) else 0)


_CHOICE = re.compile(r"Invalid value for '(?P<flag>[^']+)'(?: / '[^']+')*: '(?P<value>.*)' is "
                     r"not one of (?P<choices>.*?)\.?$")


def usage_message(text: str) -> str:
    """Typer's usage error on one line; a bad choice reads ``--method 'x': unknown (choose
    from a, b, c)``."""
    message = one_line(text).replace("Value error, ", "")
    m = _CHOICE.fullmatch(message)
    if m:
        choices = ", ".join(c.strip().strip("'") for c in m["choices"].split(","))
        return f"{m['flag']} {m['value']!r}: unknown (choose from {choices})"
    return message


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ``LatentgeoError`` into ``error: ...`` on stderr and exit status 2.

    ``LATENTGEO_DEBUG=1`` re-raises instead, to show the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LatentgeoError as e:
            if debug():
                raise
            print(f"error: {one_line(str(e))}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def strict(obj: Any) -> Any:
    """``obj`` with tensors/arrays as lists, paths as strings and every non-finite float as
    None, so that ``json.dumps(..., allow_nan=False)`` accepts it."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_json(obj: Any) -> None:
    """Write ``obj`` as strict JSON on stdout (no NaN/Infinity; plain print: Rich would wrap
    long lines)."""
    print(json.dumps(strict(obj), indent=2, allow_nan=False))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Rich table on stdout; title and cells are plain text (file names such as ``[x].pt``
    are shown as they are, never read as Rich markup)."""
    table = Table(title=escape(title))
    for c in columns:
        table.add_column(escape(c), justify="left" if c == columns[0] else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits, everything escaped for Rich."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False
                 ) -> Iterator[Callable[..., None]]:
    """Yield a ``callback(advance=1)`` that drives one Rich bar on stderr."""
    if quiet:
        yield lambda *a, **k: None
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=err_console, transient=True)
    with progress:
        task = progress.add_task(escape(description), total=total)

        def advance(*_: Any, advance: int = 1, **__: Any) -> None:
            progress.advance(task, advance)

        yield advance
