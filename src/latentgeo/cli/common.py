"""What every command shares: option aliases, error handling, Rich output, progress bars.

Rich lives here and only here; the core reports progress through plain callbacks.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from latentgeo.errors import LatentgeoError

# Results go to stdout; progress, warnings and errors to stderr, so `--json` output stays clean.
console = Console()
err_console = Console(stderr=True)

#: Iteration cap of the paper's optimisers inside ``--all-methods`` (their default is 10,000).
ALL_METHODS_REFERENCE_ITERS = 300

Output = Annotated[Path, typer.Option("--output", "-o", help="Output file (.pt/.safetensors) "
                                      "or directory (trailing '/').")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
Json = Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (torch.Generator).")]
Model = Annotated[str, typer.Option("--model", help="'bundled' (DDPM), 'bundled-flow' "
                                    "(rectified flow), or any diffusers pipeline id "
                                    "or local path (weights must be cached; no downloads).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Pipeline dtype: float32, float16, "
                                    "bfloat16 (geometry always runs in float32/64).")]
Steps = Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")]
Prompt = Annotated[str | None, typer.Option("--prompt", help="Text prompt (SD pipelines).")]
ClassLabel = Annotated[int | None, typer.Option("--class", help="Digit class 0-9 "
                                                "(bundled model; default: unconditional).")]
Guidance = Annotated[float | None, typer.Option("--guidance", help="Classifier-free guidance "
                                                "scale (default: the model's).")]


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ``LatentgeoError`` into ``error: ...`` on stderr and exit status 2.

    ``LATENTGEO_DEBUG=1`` re-raises instead, to show the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LatentgeoError as e:
            if os.environ.get("LATENTGEO_DEBUG", "") not in ("", "0"):
                raise
            message = " ".join(str(e).split())
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON on stdout (plain print: Rich would wrap long lines)."""
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
        task = progress.add_task(description, total=total)

        def advance(*_: Any, advance: int = 1, **__: Any) -> None:
            progress.advance(task, advance)

        yield advance
