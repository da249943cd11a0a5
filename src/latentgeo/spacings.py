"""Where the frames of a NAO geodesic sit along it: the spacing registry (no torch import).

The curve is always the exact NAO geodesic (``metric``); a spacing only chooses *which* of its
points are returned for fractions t in [0, 1]: the point at fraction t of the curve's total
length measured in that spacing's yardstick. ``SPACINGS`` maps names to one-line descriptions;
it feeds ``NAOMetric.geodesic``, ``interpolation.nao`` and the CLI's ``--spacing`` choices (kept
free of torch so help text can list the names without importing it). The formulas live in
``metric._locate``; ``tests/test_interpolation.py`` checks the two stay in step.

Why Euclidean is the default: off the chi shell (norms x0.8 and x1.2, as inverted seeds are) the
geodesic dives radially to the shell, follows it, and climbs out; NAO weight is huge off the
shell, so equal NAO arc length puts almost every frame on the two radial legs (6 or 7 of the 7
interior frames of 9 within 0.02% of the angle to an endpoint at d = 16384) and the frames'
polyline is several times longer than the geodesic in true NAO length (3.6-18x measured).
Equal Euclidean arc length spreads the frames along the content change (the angle) and its
9-frame polyline is within 1.1x of the geodesic (1.03-1.07x at d = 1024-65536;
``benchmarks/bench_geometry.py``, ``docs/geometry.md``).
"""

from __future__ import annotations

#: name -> what is equal between consecutive frames, along the exact NAO geodesic.
SPACINGS: dict[str, str] = {
    "euclidean": "equal Euclidean arc length (default: frames spread along the content change)",
    "nao": "equal NAO arc length (bunches frames at the ends for seeds off the chi shell)",
    "angle": "equal steps of the angle from the first seed (radial paths: Euclidean)",
}

#: The spacing used when none is given.
DEFAULT_SPACING = "euclidean"
