"""Run several ``latentgeo`` commands in one process, as a launched worker would run
``latentgeo ...`` (``python -m torch.distributed.run ... tests/scale_worker.py CMD1 -- CMD2``):
one interpreter start per rank instead of one per command keeps the launcher tests fast. The
commands go through the same entry point as the console script; the exit status is the first
non-zero one."""

from __future__ import annotations

import sys

from latentgeo.cli import app


def main(argv: list[str]) -> int:
    commands, current = [], []
    for a in argv:
        if a == "--":
            commands.append(current)
            current = []
        else:
            current.append(a)
    commands.append(current)
    status = 0
    for cmd in commands:
        try:
            app(cmd)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
