"""``--soft-tokens FILE``: the one shared hook every rendering command uses (render, invert,
optimize). Read the file before the model loads (a bad file fails fast), attach after (tokens
trained for other weights are refused with one line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentgeo.cli.options import SoftTokensFile

__all__ = ["SoftTokensFile", "read_soft_tokens", "use_soft_tokens"]


def read_soft_tokens(path: Path | None) -> Any:
    """The token set in ``path`` (None: no tokens); InputError naming the file otherwise."""
    if path is None:
        return None
    from latentgeo.align.tokens import load_tokens

    return load_tokens(path)


def use_soft_tokens(backend: Any, tokens: Any, path: Path | None) -> None:
    """Attach ``tokens`` (from :func:`read_soft_tokens`) to a loaded backend; ModelError with
    the file's name when they were trained for another model."""
    if tokens is None:
        return
    from latentgeo.align.tokens import attach

    attach(backend, tokens, f"--soft-tokens {path}")
