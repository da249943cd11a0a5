"""``python -m latentgeo``: the same as the ``latentgeo`` command."""

from latentgeo.cli import main

main()
