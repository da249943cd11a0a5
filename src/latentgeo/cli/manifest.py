"""``latentgeo manifest DIR``: merge the per-shard manifests of a job into one summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from latentgeo.cli.common import print_json, print_table
from latentgeo.cli.options import Json


def manifest(
    directory: Annotated[Path, typer.Argument(
        help="Output folder of invert/render runs (holds manifest-I-of-N.jsonl files).",
        show_default=False)],
    failures: Annotated[int, typer.Option(
        "--failures", min=0, help="List at most this many failed inputs.")] = 20,
    json: Json = False,
) -> None:
    """Merge a job's manifests (one per shard) into a summary: per shard, the items asked for,
    written, already there, failed, and whether its last run finished; the mean of each metric
    (PSNR, norm, ...) over every input; the failed inputs with their reasons.

    Exit status 2 if any input failed or any shard is incomplete (its file is missing, or its
    last run has no end record: killed or still running), so a script can wait on it.
    """
    import math

    from latentgeo.errors import InputError
    from latentgeo.jobs import merge_manifests

    summary = merge_manifests(directory)
    sums: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    for rec in summary.records.values():
        statuses[rec.get("status", "?")] = statuses.get(rec.get("status", "?"), 0) + 1
        for k, v in (rec.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                sums.setdefault(k, []).append(float(v))
    means = {k: sum(v) / len(v) for k, v in sorted(sums.items())}
    shards = [{"shard": f"{s.index}/{s.count}", "file": None if s.path is None else str(s.path),
               "command": s.command, "items": s.items, "done": s.done, "skipped": s.skipped,
               "failed": s.failed, "seconds": round(s.seconds, 3), "complete": s.complete}
              for s in summary.shards]
    failed = [{"input": r.get("input"), "error": r.get("error", "")} for r in summary.failed]
    if json:
        print_json({"directory": str(directory), "ok": summary.ok, "inputs": len(summary.records),
                    "statuses": statuses, "metric_means": means, "shards": shards,
                    "failed": failed,
                    "incomplete": [s["shard"] for s in shards if not s["complete"]]})
    else:
        rows: list[list[Any]] = [
            [s["shard"], s["command"] or "-", s["items"], s["done"], s["skipped"], s["failed"],
             s["seconds"], "yes" if s["complete"] else ("missing" if s["file"] is None
                                                       else "no")] for s in shards]
        print_table(f"{directory}: {len(summary.records)} input(s), "
                    + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())),
                    ["shard", "command", "items", "written", "already there", "failed",
                     "seconds", "complete"], rows)
        if means:
            print_table("metric means over every input", ["metric", "mean", "n"],
                        [[k, m, len(sums[k])] for k, m in means.items()])
        if failed:
            print_table(f"failed inputs ({len(failed)})", ["input", "error"],
                        [[f["input"], f["error"]] for f in failed[:failures]])
    problems = []
    if summary.failed:
        problems.append(f"{len(summary.failed)} input(s) failed")
    incomplete = [s for s in shards if not s["complete"]]
    if incomplete:
        problems.append(f"{len(incomplete)} shard(s) incomplete "
                        f"({', '.join(s['shard'] for s in incomplete[:5])}"
                        f"{', ...' if len(incomplete) > 5 else ''})")
    if problems:
        raise InputError(f"{directory}: " + "; ".join(problems))
