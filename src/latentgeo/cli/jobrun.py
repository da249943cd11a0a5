"""``invert`` and ``render`` as streaming, sharded, resumable jobs (:mod:`latentgeo.jobs`), with
progress for people (a Rich bar on rank 0 at a terminal) and for cluster logs (plain periodic
lines from every rank otherwise).

The command modules parse options; the functions here run the job for this process's shard and
return what the command prints. Imports of torch and the model stack stay inside functions
(``--help`` never imports torch).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentgeo.errors import InputError, OutputExistsError

if TYPE_CHECKING:
    import torch

    from latentgeo.jobs import Item, Provenance, Report
    from latentgeo.launch import Launch, Shard

#: Seconds between plain progress lines (``LATENTGEO_PROGRESS_EVERY`` overrides).
PROGRESS_EVERY = 30.0
#: Per-item rows kept for the final table/JSON when a shard has more items than this (and no
#: --json): none, only a summary, so memory does not grow with the job.
MAX_TABLE_ROWS = 100


# -- progress -------------------------------------------------------------------------------------
@contextmanager
def job_progress(label: str, total: int, launch: Launch, shard: Shard, quiet: bool = False,
                 stream: Any = None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n_items)``. At a terminal: a Rich bar on rank 0, silence on other ranks;
    otherwise (logs): ``[shard I/N] LABEL: k/total items, r items/s, eta`` every
    ``PROGRESS_EVERY`` seconds and at the end, from every rank. ``quiet``: nothing."""
    stream = sys.stderr if stream is None else stream
    if quiet or total == 0:
        yield lambda n: None
        return
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if tty:
        if launch.rank != 0:
            yield lambda n: None
            return
        from latentgeo.cli.common import progress_bar

        with progress_bar(f"{label} ({shard.index}/{shard.count})" if shard.count > 1
                          else label, total) as advance:
            yield lambda n: advance(advance=n)
        return
    every = float(os.environ.get("LATENTGEO_PROGRESS_EVERY", PROGRESS_EVERY))
    t0 = last = time.monotonic()
    done, printed = 0, False

    def line() -> None:
        dt = max(time.monotonic() - t0, 1e-9)
        rate = done / dt
        eta = (total - done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:.0f}s" if eta == eta else "?"
        print(f"[shard {shard.index}/{shard.count}] {label}: {done}/{total} items, "
              f"{rate:.3g} items/s, eta {eta_text}", file=stream, flush=True)

    def advance(n: int) -> None:
        nonlocal done, last, printed
        done += n
        now = time.monotonic()
        if now - last >= every:
            last, printed = now, True
            line()

    yield advance
    if printed or shard.count > 1 or launch.launched:
        line()


# -- the shared driver ----------------------------------------------------------------------------
@dataclass
class JobResult:
    """What a command prints: the shard, counts, kept rows, failures."""

    shard: Shard
    launch: Launch
    items: int
    report: Report
    rows: list[dict[str, Any]] = field(default_factory=list)
    manifest: Path | None = None

    @property
    def failed(self) -> list[tuple[Item, str]]:
        return self.report.failed


def _provenance(input_hash: str, options: dict[str, Any], fingerprint: str) -> Provenance:
    from latentgeo.jobs import Provenance

    return Provenance(input_hash, options, fingerprint)


def drive(command: str, items: Sequence[Item], out_dir: Path, *,
          target: Callable[[Item], str | Path], input_hash: Callable[[Item], str],
          options: dict[str, Any], fingerprint: str, load: Callable[[Item], Any],
          process: Callable[[list[Item], list[Any]], list[Any]], batch_size: int,
          shard: Shard, launch: Launch, force: bool, quiet: bool, label: str,
          manifest: bool = True) -> Report:
    """Plan (resume rule, refusing before any work), then stream this shard's ``items``
    through ``load``/``process`` with a manifest and progress; SIGTERM is an interrupt (the CLI's
    handler), and an interrupted run records a ``stop`` and re-raises."""
    from latentgeo import jobs
    from latentgeo.cli.common import Terminated

    plan = jobs.plan(items, target,
                     lambda it: _provenance(input_hash(it), options, fingerprint), force,
                     hint="use --force to redo, or another -o")
    jobs.clean_stale_temps(out_dir)
    # Alone and unsharded, a run in which every input fails leaves no folder and no manifest.
    alone = launch.world_size == 1 and shard.count == 1
    log = jobs.Manifest(out_dir, shard, lazy=alone) if manifest else None
    if log is not None:
        log.start(command, len(items), options, launcher=launch.launcher)
    try:
        with job_progress(label, len(items), launch, shard, quiet) as advance:
            report = jobs.run(plan.todo, load, process, batch_size=batch_size, manifest=log,
                              skipped=plan.skipped, target=target, progress=advance,
                              keep_outcomes=False)
        if log is not None and not (alone and not report.n_done and not report.skipped
                                    and log.discard()):
            log.end(report.n_done, len(report.skipped), len(report.failed), report.seconds)
    except (KeyboardInterrupt, Terminated) as e:
        if log is not None:
            log.stop("SIGTERM" if isinstance(e, Terminated) else "SIGINT")
        raise
    finally:
        if log is not None:
            log.close()
    return report


def model_fingerprint(backend: Any) -> str:
    """The provenance's model fingerprint: the weights' (:meth:`Backend.fingerprint`), plus a
    digest of the soft tokens attached (``--soft-tokens``), which change every output too."""
    import hashlib

    fp = backend.fingerprint()
    tokens = getattr(backend, "soft_tokens", None)
    if tokens is None:
        return fp
    values = tokens.values.detach().to("cpu", copy=True).contiguous().float().numpy()
    digest = hashlib.sha256(values.tobytes() + repr(tokens.points).encode()).hexdigest()[:16]
    return f"{fp}+tokens:{digest}"


def this_process(shard_text: str | None, device: str) -> tuple[Launch, Shard, str]:
    """(launch, shard, device) for this process from the environment and the options."""
    from latentgeo.launch import detect_launch, rank_device, resolve_shard

    launch = detect_launch()
    return launch, resolve_shard(shard_text, launch, "--shard"), rank_device(device, launch)


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- render ---------------------------------------------------------------------------------------
def render_job(backend: Any, seed_paths: Sequence[str | Path], out: Path, *, condition: Any,
               steps: int | None, guidance: float | None, batch_size: int, grid: bool,
               force: bool, quiet: bool, keep_rows: bool, shard: Shard, launch: Launch
               ) -> tuple[JobResult, dict[str, Any]]:
    """Render this shard's seeds to ``out/KEY.png`` (provenance in each PNG); ``grid``
    (one process only) adds ``grid.png`` of every image. Returns the result and a header
    (model, steps, guidance applied, grid path)."""
    import torch

    from latentgeo import jobs
    from latentgeo.diffusion.render import render

    given, problems = seed_items_or_refuse(seed_paths, backend.latent_shape)
    all_items = jobs.sort_items(given)
    if grid and shard.count > 1:
        raise InputError("--grid needs every image in one process: leave it out of sharded "
                         "runs (--shard, torchrun, accelerate)")
    mine = jobs.shard_items(all_items, shard)
    n_steps = backend.default_steps if steps is None else int(steps)
    g = backend.effective_guidance(condition, guidance)
    options = {"command": "render", "steps": n_steps, "guidance": g, "condition": condition,
               "dtype": str(backend.dtype).removeprefix("torch.")}
    fingerprint = model_fingerprint(backend)
    base = str(out)

    def target(it: Item) -> str:
        # str(out / NAME), built without a Path: on Python 3.11 a Path per image would intern
        # its name, and the churn of the interned-string table costs peak memory in long jobs
        name = f"{it.key}.png"
        return name if base == "." else os.path.join(base, name)

    def load(it: Item) -> tuple[torch.Tensor, str]:
        x = jobs.load_seed(it)
        return x, jobs.tensor_hash(x)

    keep = keep_rows or len(mine) <= MAX_TABLE_ROWS
    position = {it.key: i for i, it in enumerate(given)} if keep else {}
    del given
    rows: list[dict[str, Any]] = []
    images_for_grid: dict[str, torch.Tensor] = {}

    def process(items: list[Item], inputs: list[tuple[torch.Tensor, str]]) -> list[Any]:
        z = torch.stack([x for x, _ in inputs])
        images = render(backend, z, condition=condition, steps=n_steps, guidance=guidance,
                        batch_size=len(items))
        norms = z.flatten(1).double().norm(dim=1).tolist()
        outcomes = []
        finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
        for it, (x, h), img, nrm, ok in zip(items, inputs, images, norms, finite):
            if not ok:  # never a black PNG for a seed the model cannot render
                outcomes.append(jobs.Outcome(None, error=(
                    f"rendering gives NaN or infinite pixels (seed entries up to "
                    f"{float(x.abs().max()):.3g}; a seed's are about 1); no image written")))
                continue
            path = jobs.save_png(target(it), img, _provenance(h, options, fingerprint),
                                 force=force)
            outcomes.append(jobs.Outcome(path, {"norm": nrm}))
            if keep:
                rows.append({"seed": it.key, "source": it.source, "norm": nrm,
                             "image": str(path)})
            if grid:
                images_for_grid[it.key] = img
        return outcomes

    grid_path = out / "grid.png"
    grid_prov = None
    if grid:
        grid_prov = _provenance(jobs.bytes_hash("".join(
            jobs.tensor_hash(jobs.load_seed(it)) for it in mine).encode()),
            {**options, "grid": True}, fingerprint)
        _check_whole_output(grid_path, grid_prov, force)
    report = drive("render", mine, out, target=target,
                   input_hash=lambda it: jobs.tensor_hash(jobs.load_seed(it)), options=options,
                   fingerprint=fingerprint, load=load, process=process, batch_size=batch_size,
                   shard=shard, launch=launch, force=force, quiet=quiet,
                   label=f"rendering {len(mine)} seed(s)")
    header: dict[str, Any] = {"model": backend.name, "steps": n_steps, "guidance": g,
                              "problems": problems}
    if grid and grid_prov is not None and not report.failed:
        header["grid"] = str(_write_grid(backend, out, mine, images_for_grid, grid_path,
                                         grid_prov, force))
    if keep:
        for it in report.skipped:
            rows.append({"seed": it.key, "source": it.source, "norm": None,
                         "image": str(target(it)), "skipped": True})
        rows.sort(key=lambda r: position[r["seed"]])  # the order given
    return JobResult(shard, launch, len(mine), report, rows), header


def _check_whole_output(path: Path, prov: Provenance, force: bool) -> None:
    """The resume rule for one output made from every item (grid.png, a batch file)."""
    from latentgeo import jobs

    if force or not path.exists():
        return
    old = jobs.read_provenance(path)
    if old is None:
        raise OutputExistsError(f"{path}: exists without latentgeo provenance; use --force "
                                "to redo, or another -o")
    diff = prov.differences(old)
    if diff:
        raise OutputExistsError(f"{path}: exists from a different run ({'; '.join(diff)}); "
                                "use --force to redo, or another -o")


def _write_grid(backend: Any, out: Path, items: Sequence[Item], fresh: dict[str, Any],
                path: Path, prov: Provenance, force: bool) -> Path:
    import torch

    from latentgeo import jobs
    from latentgeo.cli.rendering import view_scale
    from latentgeo.images import load_image, make_grid, upscale

    if path.exists() and not force:
        return path  # same provenance (checked before the work)
    imgs = [fresh[it.key] if it.key in fresh else
            load_image(out / f"{it.key}.png", backend.image_size, backend.image_channels)
            for it in items]
    k = view_scale(backend)
    return jobs.save_png(path, make_grid(upscale(torch.stack(imgs), k)), prov, force=force)


# -- invert ---------------------------------------------------------------------------------------
def invert_job(backend: Any, paths: Sequence[Path], names: Sequence[str], output: Path, *,
               to_dir: bool, suffix: str, condition: Any, prompt: str | None,
               class_label: int | None, steps: int | None, guidance: float,
               fixed_point: int, tol: float | None, anderson: int, check: bool,
               batch_size: int, force: bool, quiet: bool, keep_rows: bool, shard: Shard,
               launch: Launch) -> tuple[JobResult, dict[str, Any]]:
    """Invert this shard's images: one seed file per image (``output/NAME.SUFFIX``, provenance
    in its metadata) streamed as chunks finish, or (``to_dir`` False, one process only) one
    batch file written at the end. Metrics per image: norm, chi z, NFE, max step residual and,
    with ``check``, latent RMSE and PSNR of the round trip."""
    import torch

    from latentgeo import __version__, jobs
    from latentgeo.chi import norm_z_scores
    from latentgeo.diffusion.inversion import check_roundtrip, invert_images
    from latentgeo.images import load_image

    if not to_dir and shard.count > 1:
        raise InputError(f"-o {output}: one batch file cannot be written by several shards; "
                         "give a folder (trailing '/') with --shard, torchrun or accelerate")
    given = [jobs.Item(n, str(p)) for p, n in zip(paths, names)]
    all_items = jobs.sort_items(given)
    # a batch file (one process) keeps the order given; a folder's shards take sorted blocks
    mine = jobs.shard_items(all_items, shard) if to_dir else given
    position = {it.key: i for i, it in enumerate(given)} if len(mine) <= MAX_TABLE_ROWS \
        or keep_rows else {}
    n_steps = backend.default_steps if steps is None else int(steps)
    method = "ddim" if fixed_point == 0 else f"ddim-fixed-point-{fixed_point}"
    tol_value = tol if tol is not None else 1e-5
    applied = backend.effective_guidance(condition, guidance)  # 1 when unconditional
    options = {"command": "invert", "steps": n_steps, "guidance": applied,
               "condition": condition, "fixed_point_iters": fixed_point, "tol": tol_value,
               "anderson": anderson, "dtype": str(backend.dtype).removeprefix("torch.")}
    fingerprint = model_fingerprint(backend)
    meta = {"model": backend.name, "family": backend.family, "steps": str(n_steps),
            "guidance": str(applied), "method": method, "fixed_point_iters": str(fixed_point),
            "anderson": str(anderson), "tol": str(tol_value), "latentgeo": __version__}
    if prompt is not None:
        meta["prompt"] = prompt
    if class_label is not None:
        meta["class"] = str(class_label)
    out_dir = output if to_dir else (output.parent if str(output.parent) else Path("."))

    def target(it: Item) -> Path:
        return output / f"{it.key}{suffix}" if to_dir else output

    def load(it: Item) -> tuple[torch.Tensor, str]:
        img = load_image(it.source, backend.image_size, backend.image_channels)
        return img, jobs.file_hash(it.source)

    keep = keep_rows or len(mine) <= MAX_TABLE_ROWS or not to_dir
    rows: list[dict[str, Any]] = []
    collected: list[tuple[Item, torch.Tensor, str]] = []

    def process(items: list[Item], inputs: list[tuple[torch.Tensor, str]]) -> list[Any]:
        batch = torch.stack([x for x, _ in inputs])
        res = invert_images(backend, batch, condition=condition, steps=n_steps,
                            guidance=guidance, fixed_point_iters=fixed_point, tol=tol,
                            anderson=anderson, batch_size=len(items))
        trip = None
        if check:
            trip = check_roundtrip(backend, res.seeds, res.x0, batch, condition=condition,
                                   steps=n_steps, guidance=guidance, batch_size=len(items))
        z = norm_z_scores(res.seeds)
        norms = res.seeds.flatten(1).double().norm(dim=1)
        outcomes = []
        finite = torch.isfinite(res.seeds).flatten(1).all(dim=1).tolist()
        for i, (it, (_, h)) in enumerate(zip(items, inputs)):
            if not finite[i]:  # never write a seed the tool would refuse to read
                outcomes.append(jobs.Outcome(None, error="inversion gave NaN or infinite "
                                                         "seed entries"))
                continue
            metrics = {"norm": float(norms[i]), "chi_z": float(z[i]), "nfe": int(res.nfe[i]),
                       "max_step_residual": float(res.max_residual[i])}
            if trip is not None:
                metrics["latent_rmse"] = float(trip.latent_rmse[i])
                metrics["psnr_db"] = float(trip.psnr[i])
            if to_dir:
                path = jobs.save_seed(target(it), res.seeds[i], {**meta, "source": it.source},
                                      _provenance(h, options, fingerprint), force=force)
                seed_name = str(path)
            else:
                collected.append((it, res.seeds[i].clone(), h))
                path, seed_name = output, None
            outcomes.append(jobs.Outcome(path, metrics))
            if keep:
                rows.append({"image": it.source, "seed": seed_name, **metrics})
        return outcomes

    if to_dir:
        report = drive("invert", mine, out_dir, target=target,
                       input_hash=lambda it: jobs.file_hash(it.source), options=options,
                       fingerprint=fingerprint, load=load, process=process,
                       batch_size=batch_size, shard=shard, launch=launch, force=force,
                       quiet=quiet, label=f"inverting {len(mine)} image(s)")
    else:
        report = _invert_to_file(mine, output, options, fingerprint, meta, load, process,
                                 collected, batch_size, force, quiet, launch, shard)
    if not to_dir:  # rows in the order of the batch file's rows
        for i, r in enumerate(rows):
            r["seed"] = f"{output}[{i}]"
    if keep and to_dir:
        for it in report.skipped:
            rows.append({"image": it.source, "seed": str(target(it)), "skipped": True})
        rows.sort(key=lambda r: position[Path(r["seed"]).stem])  # the order given
    header = {"model": backend.name, "steps": n_steps, "guidance": applied, "method": method}
    return JobResult(shard, launch, len(mine), report, rows), header


def _invert_to_file(items: Sequence[Item], output: Path, options: dict[str, Any],
                    fingerprint: str, meta: dict[str, str], load: Callable[[Item], Any],
                    process: Callable[..., list[Any]],
                    collected: list[tuple[Item, Any, str]], batch_size: int, force: bool,
                    quiet: bool, launch: Launch, shard: Shard) -> Report:
    """Every seed into one batch file, written once at the end (all or nothing); its
    provenance hashes every input, so an equal re-run skips it and a different one is
    refused before any work."""
    import json as _json

    import torch

    from latentgeo import jobs

    whole = _provenance(jobs.bytes_hash("".join(jobs.file_hash(it.source) if
                                                Path(it.source).is_file() else "-"
                                                for it in items).encode()),
                        options, fingerprint)
    if output.exists() and not force:
        _check_whole_output(output, whole, force)
        return jobs.Report(skipped=list(items))
    with job_progress(f"inverting {len(items)} image(s)", len(items), launch, shard,
                      quiet) as adv:
        report = jobs.run(items, load, process, batch_size=batch_size, progress=adv)
    if collected:
        sources = _json.dumps([it.source for it, _, _ in collected])
        jobs.save_seed(output, torch.stack([s for _, s, _ in collected]),
                       {**meta, "source": sources}, whole, force=force)
    return report


def fail_or_warn(result: JobResult, written: int, message: str | None = None,
                 problems: Sequence[str] = ()) -> None:
    """The batch failure rule (docs/bad-input.md): one ``skipped: NAME: reason`` line per failed
    item on stderr, then, alone, one ``error:`` line summing up (exit 2); a single failed item
    with nothing written is just that one ``error:`` line. Under a launcher the summary is a
    warning (exit 0): the failures are in the manifest (:func:`latentgeo.jobs.exit_on_failures`)."""
    from latentgeo import jobs

    lines = list(problems) + [why if why.startswith(it.source) else f"{it.source}: {why}"
                              for it, why in result.failed]
    if not lines:
        return
    alone = result.launch.world_size <= 1
    if alone and len(lines) == 1 and written == 0:
        raise InputError(lines[0])
    for line in lines:
        warn(f"skipped: {line}")
    if alone:
        raise InputError(message if message is not None else
                         f"{len(lines)} input(s) skipped, {written} output(s) written")
    if result.failed:
        jobs.exit_on_failures(result.failed, written, result.launch.world_size, warn)
    else:
        warn(f"warning: {len(lines)} input(s) skipped (exit 0 under the launcher)")


def summary_rows(result: JobResult) -> list[list[Any]]:
    """Rows of the summary table printed for jobs too large for a per-item table."""
    rep = result.report
    return [["written", rep.n_done], ["already there (skipped)", len(rep.skipped)],
            ["failed", len(rep.failed)], ["seconds", round(rep.seconds, 2)]]


def seed_record(res: Any, i: int, seed: str, output: str) -> dict[str, Any]:
    """Seed ``i`` of an :class:`~latentgeo.optimize.OptimizeResult` as a result row: status,
    best iteration, and target / held-out reward, regulariser and norm z before and after."""
    before, best = res.before(i), res.best(i)
    return {"seed": seed, "output": output, "status": res.status[i],
            "best_iteration": res.best_iteration[i], "iterations": len(res.log[i]) - 1,
            "nfe": res.nfe[i] if res.nfe else None,
            "reward_before": before["target"], "reward_after": best["target"],
            "heldout_before": before["heldout"], "heldout_after": best["heldout"],
            "regularizer_before": before["regularizer"],
            "regularizer_after": best["regularizer"],
            "norm_z_before": before["norm_z"], "norm_z_after": best["norm_z"]}


#: The per-seed fields of :func:`seed_record` kept in an optimised seed file's metadata.
SEED_META_FIELDS = ("reward_before", "reward_after", "heldout_before", "heldout_after",
                    "regularizer_before", "regularizer_after", "best_iteration", "status")


def optimize_metadata(res: Any, settings: Any, backend: Any, steps: int, condition: Any,
                      record: dict[str, Any]) -> dict[str, str]:
    """String metadata of one optimised seed file: the run's settings and its own record."""
    from latentgeo import __version__

    return {"method": f"optimize:{settings.preset}", "model": backend.name,
            "rewards": ",".join(res.rewards),
            "reward_weights": ",".join(f"{w:g}" for w in res.weights),
            "regularizer": settings.reg, "reg_weight": f"{settings.reg_weight:g}",
            "rescale": str(settings.rescale), "preset": settings.preset,
            "optimizer": settings.optimizer.name, "lr": f"{settings.optimizer.lr:g}",
            "clip": str(settings.clip), "iterations": str(settings.iters),
            "steps": str(steps), "latentgeo": __version__,
            "condition": "" if condition is None else str(condition),
            **{k: str(record[k]) for k in SEED_META_FIELDS}}


def seed_items_or_refuse(seed_paths: Sequence[str | Path], latent_shape: Sequence[int]
                         ) -> tuple[list[Item], list[str]]:
    """:func:`latentgeo.jobs.seed_items`, refusing (one line, or ``skipped:`` lines and a
    summary) when no seed file can be used."""
    from latentgeo import jobs
    from latentgeo.cli.common import refuse_all_skipped

    given, problems = jobs.seed_items(seed_paths, latent_shape)
    if not given:
        refuse_all_skipped(problems, "seed file(s) could be used")
    return given, problems


# -- optimize -------------------------------------------------------------------------------------
def _settings_options(d: dict[str, Any]) -> dict[str, Any]:
    """The settings as provenance options, without the fields added for SeedSelect while they
    hold their neutral defaults (no lr schedule, the model's steps and guidance), so a folder
    written before they existed still resumes."""
    d = dict(d, optimizer=dict(d["optimizer"]))
    if d["optimizer"].get("decay_at") is None:
        d["optimizer"].pop("decay_at", None)
        d["optimizer"].pop("decay", None)
    for key in ("steps", "guidance"):
        if d.get(key) is None:
            d.pop(key, None)
    return d


def optimize_job(backend: Any, seed_paths: Sequence[str | Path], out: Path, *, suffix: str,
                 rewards: Sequence[Any], reward_specs: Sequence[str],
                 weights: Sequence[float] | None, settings: Any, condition: Any,
                 steps: int | None, guidance: float | None, stop_at: float | None,
                 render_dir: Path | None, batch_size: int, force: bool, quiet: bool,
                 keep_rows: bool, shard: Shard, launch: Launch,
                 start: tuple[Sequence[str], torch.Tensor, str] | None = None,
                 extra_options: dict[str, Any] | None = None
                 ) -> tuple[JobResult, dict[str, Any]]:
    """Optimise this shard's seeds ``--batch-size`` at a time (every seed is its own problem,
    and the randomised regularisers draw the same permutations for a batch as for single seeds,
    so chunking changes no result): ``out/KEY.SUFFIX`` per seed with its provenance, and with
    ``render_dir`` ``KEY_before.png``, ``KEY_after.png``, ``KEY_trajectory.png`` (written
    first, so an existing seed file means its pictures are there). Metrics per seed: rewards,
    held-out reward, regulariser and norm z before/after, best iteration, status.

    ``start`` = (keys, seeds (N, *latent_shape), label): optimise these in-memory start seeds
    (``optimize --init``) instead of ``seed_paths``; item i is keyed ``keys[i]`` and named
    ``LABEL[i]``. ``extra_options`` join the provenance (e.g. hashes of reference images)."""
    from dataclasses import asdict

    import torch

    from latentgeo import jobs
    from latentgeo.cli.rendering import view_scale
    from latentgeo.diffusion import render as render_seeds
    from latentgeo.images import make_grid, upscale
    from latentgeo.optimize import optimize as run_optimize

    if start is not None:
        keys, start_z, label = start
        given = [jobs.Item(k, f"{label}[{i}]", i) for i, k in enumerate(keys)]
    else:
        given, problems = seed_items_or_refuse(seed_paths, backend.latent_shape)
        if problems:  # optimize refuses a partly unusable input set (its earlier rule)
            more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
            raise InputError(problems[0] + more)
    all_items = jobs.sort_items(given)
    mine = jobs.shard_items(all_items, shard)
    n_steps = backend.default_steps if steps is None else int(steps)
    options = {"command": "optimize", "settings": _settings_options(asdict(settings)),
               "rewards": list(reward_specs), "weights": None if not weights else list(weights),
               "steps": n_steps, "guidance": backend.effective_guidance(condition, guidance),
               "condition": condition, "stop_at": stop_at, "reg_seed": 0,
               "render": render_dir is not None,
               "dtype": str(backend.dtype).removeprefix("torch."), **(extra_options or {})}
    fingerprint = model_fingerprint(backend)
    keep = keep_rows or len(mine) <= MAX_TABLE_ROWS
    position = {it.key: i for i, it in enumerate(given)} if keep else {}
    del given
    rows: list[dict[str, Any]] = []
    header: dict[str, Any] = {"model": backend.name}
    keep_every = max(1, settings.iters // 8) if render_dir is not None else None

    def target(it: Item) -> Path:
        return out / f"{it.key}{suffix}"

    def load_start(it: Item) -> torch.Tensor:
        return start_z[int(it.ref)].to(torch.float32).contiguous()

    read = jobs.load_seed if start is None else load_start

    def load(it: Item) -> tuple[torch.Tensor, str]:
        x = read(it)
        return x, jobs.tensor_hash(x)

    def save_picture(path: Path, img: torch.Tensor, prov: Provenance) -> None:
        # a picture of this item left by an interrupted run of the same job is replaced
        mine_before = path.exists() and jobs.read_provenance(path) == prov
        jobs.save_png(path, img, prov, force=force or mine_before)

    def process(items: list[Item], inputs: list[tuple[torch.Tensor, str]]) -> list[Any]:
        z = torch.stack([x for x, _ in inputs])
        res = run_optimize(backend, z, rewards, weights=weights or None, condition=condition,
                           steps=steps, guidance=guidance, settings=settings,
                           stop_at=stop_at, keep_every=keep_every)
        header.setdefault("rewards", res.rewards)
        header.setdefault("weights", res.weights)
        finite = torch.isfinite(res.seeds).flatten(1).all(dim=1).tolist()
        if render_dir is not None:
            k = view_scale(backend)
            before_imgs = render_seeds(backend, z, condition, steps, guidance)
            after_imgs = render_seeds(backend, res.seeds, condition, steps, guidance)
        outcomes = []
        for i, (it, (_, h)) in enumerate(zip(items, inputs)):
            if not finite[i]:
                outcomes.append(jobs.Outcome(None, error=f"{it.source}: the optimised seed "
                                             "has NaN or infinite entries"))
                continue
            prov = _provenance(h, options, fingerprint)
            rec = seed_record(res, i, it.key, str(target(it)))
            if render_dir is not None:
                save_picture(render_dir / f"{it.key}_before.png", before_imgs[i], prov)
                save_picture(render_dir / f"{it.key}_after.png", after_imgs[i], prov)
                traj = torch.stack([zt for _, zt in res.trajectory[i]])
                frames = render_seeds(backend, traj, condition, steps, guidance)
                save_picture(render_dir / f"{it.key}_trajectory.png",
                             make_grid(upscale(frames, k), nrow=frames.shape[0]), prov)
                rec["images"] = [str(render_dir / f"{it.key}_{w}.png")
                                 for w in ("before", "after", "trajectory")]
                rec["trajectory_iterations"] = [t for t, _ in res.trajectory[i]]
            meta = {**optimize_metadata(res, settings, backend, n_steps, condition, rec),
                    "source": it.source}
            path = jobs.save_seed(target(it), res.seeds[i], meta, prov, force=force)
            metrics = {k: rec[k] for k in ("reward_before", "reward_after", "heldout_before",
                                           "heldout_after", "regularizer_before",
                                           "regularizer_after", "norm_z_before",
                                           "norm_z_after", "best_iteration", "status",
                                           "nfe")}
            outcomes.append(jobs.Outcome(path, metrics))
            if keep:
                rec["log"] = res.log[i]
                rows.append(rec)
        return outcomes

    report = drive("optimize", mine, out, target=target,
                   input_hash=lambda it: jobs.tensor_hash(read(it)), options=options,
                   fingerprint=fingerprint, load=load, process=process, batch_size=batch_size,
                   shard=shard, launch=launch, force=force, quiet=quiet,
                   label=f"optimising {len(mine)} seed(s) ({settings.preset})")
    if keep:
        for it in report.skipped:
            rows.append({"seed": it.key, "output": str(target(it)), "skipped": True})
        rows.sort(key=lambda r: position[r["seed"]])  # the order given
    return JobResult(shard, launch, len(mine), report, rows), header
