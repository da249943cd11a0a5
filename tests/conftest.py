"""Shared fixtures: a CLI runner whose results keep stdout and stderr apart."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from latentgeo.cli import app


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, expect: int | None = 0):
        result = self.runner.invoke(app, [str(a) for a in args])
        if expect is not None:
            assert result.exit_code == expect, (
                f"exit {result.exit_code} != {expect}\nstdout:\n{result.stdout}\n"
                f"stderr:\n{result.stderr}\nexception: {result.exception!r}")
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr starting with 'error:' (a usage error may add one
    'Usage:' hint line after it), no traceback, no blank line."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2 and all(ln.strip() for ln in lines), result.stderr
    assert lines[0].startswith("error: "), lines[0]
    if len(lines) == 2:
        assert lines[1].startswith("Usage: "), lines[1]
    assert "Traceback" not in result.stderr + result.stdout
    for f in fragments:
        assert f in lines[0], (f, lines[0])
