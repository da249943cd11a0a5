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
import signal
import sys
import warnings
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
            with sigterm_unwinds():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Terminated:  # outside a command (while parsing): nothing to clean up
            print("error: terminated", file=sys.stderr)
            sys.exit(143)
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


class Terminated(BaseException):
    """Raised in the main thread by the CLI's SIGTERM handler: unwinds like KeyboardInterrupt
    (temporary files removed, nothing half-published), then exit status 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the CLI runs, SIGTERM raises :class:`Terminated` instead of killing the process
    outright, so every ``finally``/``except BaseException`` cleanup runs (only possible in the
    main thread; elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def os_error_line(e: OSError) -> str:
    """An OS error in the user's terms: the file, then the system's reason."""
    reason = e.strerror or _first_line(str(e)) or type(e).__name__
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    return f"{where}: {reason}" if where else reason


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def cli_message(e: LatentgeoError) -> str:
    """A library error in the CLI's words: the library names arguments (``force=True``), the
    CLI names its flags (``--force``)."""
    from latentgeo.errors import OutputExistsError

    if isinstance(e, OutputExistsError) and getattr(e, "path", None) is not None:
        return f"{e.path}: exists (use --force to overwrite)"
    return str(e).replace("force=True", "--force")


def refuse_all_skipped(problems: Sequence[str], what: str) -> None:
    """Nothing could be done: the one problem as the ``error:`` line, or one ``skipped:`` line
    per problem and ``error: none of the N {what}`` (the batch rule, docs/bad-input.md)."""
    from latentgeo.errors import InputError

    if len(problems) == 1:
        raise InputError(problems[0])
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)
    raise InputError(f"none of the {len(problems)} {what}")


def report_skipped(problems: Sequence[str], summary: str) -> None:
    """Some items failed, the rest are done: one ``skipped:`` line each, then ``error:
    {summary}`` (exit 2). Nothing when ``problems`` is empty."""
    from latentgeo.errors import InputError

    if problems:
        for msg in problems:
            print(f"skipped: {msg}", file=sys.stderr)
        raise InputError(summary)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command so that nothing but one line reaches the user when it fails.

    ``LatentgeoError`` becomes ``error: ...`` on stderr and exit status 2; so do OS errors
    (read-only folder, disk full, a file where a folder is expected) and running out of memory.
    Ctrl-C and SIGTERM print ``error: interrupted`` / ``error: terminated`` (exit 130 / 143)
    after every temporary file is removed. Library warnings (numpy, torch, Pillow, diffusers)
    are silenced while the command runs. ``LATENTGEO_DEBUG=1`` shows warnings and re-raises,
    to show the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                if not debug():
                    warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except LatentgeoError as e:
            if debug():
                raise
            print(f"error: {one_line(cli_message(e))}", file=sys.stderr)
            raise typer.Exit(2) from None
        except OSError as e:
            # a closed pipe (`latentgeo stats ... | head`) is Typer's quiet exit, not an error
            if debug() or isinstance(e, BrokenPipeError):
                raise
            print(f"error: {one_line(os_error_line(e))}", file=sys.stderr)
            raise typer.Exit(2) from None
        except MemoryError:
            if debug():
                raise
            print("error: out of memory (try a smaller --batch-size or fewer inputs)",
                  file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Terminated:
            print("error: terminated", file=sys.stderr)
            raise typer.Exit(143) from None
        except (typer.Exit, typer.Abort, typer.TyperException):  # Typer's own control flow
            raise
        except Exception as e:  # a bug: still one line, and exit 1 (not a refusal)
            if debug():
                raise
            print(f"error: unexpected {type(e).__name__}: {one_line(_first_line(str(e)))} "
                  "(a bug; LATENTGEO_DEBUG=1 shows the traceback)", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


#: A latent whose RMS entry (float64) is below this has, for every norm-aware method, zero norm:
#: zero itself, or denormal numbers whose direction float32 cannot represent.
ZERO_RMS = 1e-30


def rms(x: Any) -> float:
    """Root-mean-square entry of a tensor, in float64 (no overflow, no underflow)."""
    return float(x.detach().double().pow(2).mean().sqrt())


def refuse_zero(x: Any, name: str, what: str) -> None:
    """InputError when latent ``x`` (read from ``name``) has (almost) zero norm, which
    ``what`` ('slerp interpolation', ...) cannot take."""
    from latentgeo.errors import InputError

    r = rms(x)
    if r < ZERO_RMS:
        kind = "the zero latent" if r == 0 else f"a latent of almost zero norm ({r:.3g} per entry)"
        raise InputError(f"{name}: is {kind}; {what} needs a direction, and a seed's entries "
                         "are about 1 in size")


@contextmanager
def numbers_in_range(what: str, x: Any) -> Iterator[None]:
    """Turn the math core's arithmetic failures on absurd inputs (ValueError: math domain
    error, OverflowError, ...) into one InputError about ``what`` and the inputs' size."""
    from latentgeo.errors import InputError

    try:
        yield
    except (ValueError, OverflowError, ZeroDivisionError, FloatingPointError) as e:
        raise InputError(f"{what} cannot be computed for these latents ({_first_line(str(e))}; "
                         f"entries up to {float(x.detach().abs().max()):.3g}, where a seed's "
                         "are about 1)") from None


def refuse_non_finite(x: Any, what: str) -> None:
    """LatentgeoError before writing when a computed result has NaN or infinite entries."""
    import torch

    from latentgeo.errors import InputError

    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise InputError(f"{what} has {bad} NaN or infinite entries for these inputs; nothing "
                         "was written")


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
    """Yield a ``callback(advance=1)`` that drives one Rich bar on stderr. No bar when
    ``quiet`` or when stderr is not a terminal (a log file or pipe gets no bar and no blank
    line, so errors stay one line)."""
    if quiet or not err_console.is_terminal:
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
