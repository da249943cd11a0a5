"""``latentgeo optimize``: optimise seeds for rewards, regularised towards Gaussian noise."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from latentgeo.cli import names
from latentgeo.cli.options import (
    BatchSize,
    ClassLabel,
    Device,
    Dtype,
    Force,
    Format,
    Guidance,
    Height,
    Json,
    Model,
    Offload,
    Output,
    Prompt,
    Render,
    Shard,
    SoftTokensFile,
    Steps,
    Width,
    finite,
)
from latentgeo.errors import InputError

RegName = Literal[names.REGULARIZERS]  # type: ignore[valid-type]
PresetName = Literal[names.OPTIMIZE_PRESETS]  # type: ignore[valid-type]
OptimizerName = Literal[names.OPTIMIZERS]  # type: ignore[valid-type]

Seeds = Annotated[list[Path], typer.Argument(help="Seed files (.pt/.safetensors) or directories "
                                             "of them (a file may hold a batch (N, ...)).")]
RewardSpec = Annotated[list[str], typer.Option(
    "--reward", help="Reward KIND:ARGUMENT, repeatable: class:N (digit judge, bundled-style "
    "models), clip:TEXT (needs --reward-model), python:MODULE:FUNCTION.")]
RewardWeight = Annotated[list[float] | None, typer.Option(
    "--reward-weight", help="Weight of each --reward, in order (default 1 each).")]
RewardModel = Annotated[Path | None, typer.Option(
    "--reward-model", help="Local transformers CLIPModel folder for clip:TEXT rewards.")]
Reg = Annotated[RegName | None, typer.Option(
    "--reg", help="Gaussianity regulariser (default: the preset's).")]
RegWeight = Annotated[float | None, typer.Option(
    "--reg-weight", min=0.0, callback=finite,
    help="Regulariser weight lambda (with --rescale: a ratio of gradient norms).")]
Rescale = Annotated[bool | None, typer.Option(
    "--rescale/--no-rescale", help="Rescale the regulariser's gradient to the reward "
    "gradient's norm before weighting (default: the preset's).")]
Preset = Annotated[PresetName, typer.Option(
    "--preset", help="default (the reno loop with the regulariser the reward-hacking table "
    "chose), or a published loop: reno, mpgr, dno; every value overridable.")]
Iters = Annotated[int | None, typer.Option(
    "--iters", "--max-iters", min=0, max=1_000_000,
    help="Optimiser iterations (default: the preset's).")]
Lr = Annotated[float | None, typer.Option("--lr", min=0.0, callback=finite,
                                          help="Learning rate (default: the preset's).")]
Clip = Annotated[float | None, typer.Option(
    "--clip", min=0.0, callback=finite, help="Per-seed gradient-norm clip (default: the "
    "preset's; 0 = no clipping).")]
Optimizer = Annotated[OptimizerName | None, typer.Option(
    "--optimizer", help="sgd (Nesterov momentum) or adamw (default: the preset's).")]
StopAt = Annotated[float | None, typer.Option(
    "--stop-at", callback=finite, help="Stop a seed once its target reward reaches this.")]


def _check_specs(rewards: list[str], weights: list[float] | None,
                 reward_model: object = None) -> None:
    """Torch-free checks of --reward / --reward-weight / --reward-model before any model
    loads."""
    if not rewards:
        raise InputError("--reward: give at least one (class:N, clip:TEXT, "
                         "python:MODULE:FUNCTION)")
    for spec in rewards:
        kind, sep, _ = spec.partition(":")
        if kind not in names.REWARD_KINDS or not sep:
            raise InputError(f"--reward {spec!r}: unknown reward (choose from class:N, "
                             "clip:TEXT, python:MODULE:FUNCTION)")
        if kind == "clip" and reward_model is None:
            raise InputError(f"--reward {spec!r} needs --reward-model PATH (a local "
                             "transformers CLIPModel folder)")
    if weights and len(weights) != len(rewards):
        raise InputError(f"--reward-weight: {len(weights)} weight(s) for {len(rewards)} "
                         "reward(s); give one per --reward, in order")
    if weights and not all(math.isfinite(w) for w in weights):
        raise InputError("--reward-weight: weights must be finite numbers")


def optimize(
    seeds: Seeds,
    output: Output,
    reward: RewardSpec,
    reward_weight: RewardWeight = None,
    reward_model: RewardModel = None,
    reg: Reg = None,
    reg_weight: RegWeight = None,
    rescale: Rescale = None,
    preset: Preset = "default",
    iters: Iters = None,
    lr: Lr = None,
    clip: Clip = None,
    optimizer: Optimizer = None,
    stop_at: StopAt = None,
    steps: Steps = None,
    model: Model = "bundled",
    class_label: ClassLabel = None,
    prompt: Prompt = None,
    guidance: Guidance = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    height: Height = None,
    width: Width = None,
    offload: Offload = False,
    render: Render = None,
    fmt: Format = "safetensors",
    batch_size: BatchSize = 16,
    shard: Shard = None,
    soft_tokens: SoftTokensFile = None,
    force: Force = False,
    json: Json = False,
) -> None:
    """Optimise each seed for a weighted sum of rewards minus a Gaussianity regulariser.

    Every seed is its own problem (clipping, regulariser, stopping); the best iterate by the
    optimised objective is written, one file per input seed with the same name, with metadata
    (rewards before/after, held-out reward, regulariser, preset, iterations). The bundled
    digit model takes class:N rewards (judge A; judge B is reported as the held-out reward);
    SD-family pipelines take clip:TEXT with --reward-model. --render DIR writes NAME_before.png,
    NAME_after.png and NAME_trajectory.png per seed. GPU: --device cuda --dtype bfloat16.

    Into a folder, seeds stream through --batch-size at a time, each written with its
    provenance when its chunk is done: a re-run skips seeds already optimised with the same
    options (resume), refuses ones made otherwise (--force redoes them), and logs every seed in
    OUTPUT/manifest-*.jsonl. Under torchrun or accelerate launch each process takes its own
    share; --shard I/N splits the work for job arrays.
    """
    _check_specs(reward, reward_weight, reward_model)
    import torch

    from latentgeo.cli.common import err_console, print_json, print_table, refuse_non_finite
    from latentgeo.cli.jobrun import optimize_metadata, seed_record
    from latentgeo.cli.render import load_seeds
    from latentgeo.cli.rendering import check_targets, condition_from, view_scale
    from latentgeo.diffusion import load_model
    from latentgeo.diffusion import render as render_seeds
    from latentgeo.images import make_grid, save_image, upscale
    from latentgeo.io import latent_file_names, output_is_dir, save_latent
    from latentgeo.optimize import optimize as run_optimize
    from latentgeo.optimize import parse_reward, resolve

    paths = latent_file_names([str(s) for s in seeds])  # missing files fail before loading
    if lr is not None and lr <= 0:
        raise InputError(f"--lr {lr}: must be positive")
    settings = resolve(preset, optimizer=optimizer, lr=lr, iters=iters, reg=reg,
                       reg_weight=reg_weight, rescale=rescale,
                       clip=None if clip is None else (math.inf if clip == 0 else clip))
    to_dir = output_is_dir(output)
    if to_dir and output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    if render is not None and render.exists() and not render.is_dir():
        raise InputError(f"--render {render}: exists and is not a directory")

    from latentgeo.cli.jobrun import this_process

    launch, my_shard, my_device = this_process(shard, device)
    if not to_dir and my_shard.count > 1:
        raise InputError(f"-o {output}: one file cannot be written by several shards; give a "
                         "folder (trailing '/') with --shard, torchrun or accelerate")
    from latentgeo.cli.soft_tokens import read_soft_tokens, use_soft_tokens

    tokens = read_soft_tokens(soft_tokens)  # a bad token file fails before the model loads
    backend = load_model(model, my_device, dtype, height=height, width=width, offload=offload)
    use_soft_tokens(backend, tokens, soft_tokens)
    condition = condition_from(backend, prompt, class_label)
    if to_dir:
        _optimize_job(backend, paths, output, f".{fmt}", reward, reward_weight, reward_model,
                      settings, condition, steps, guidance, stop_at, render, batch_size, force,
                      json, launch, my_shard)
        return
    z, seed_names, problems = load_seeds([str(p) for p in paths], backend.latent_shape)
    if problems:
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    if not to_dir and z.shape[0] > 1:
        raise InputError(f"{output}: {z.shape[0]} seeds need an output directory (trailing "
                         "'/')")
    rewards = [parse_reward(s, backend, None if reward_model is None else str(reward_model),
                            backend.device) for s in reward]
    suffix = f".{fmt}"
    targets = [output / f"{n}{suffix}" for n in seed_names] if to_dir else [output]
    images_out = []
    if render is not None:
        images_out = [render / f"{n}_{what}.png" for n in seed_names
                      for what in ("before", "after", "trajectory")]
    check_targets([*targets, *images_out], force)

    total = settings.iters + 1
    keep = max(1, settings.iters // 8) if render is not None else None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        TextColumn("{task.fields[live]}"), console=err_console,
                        transient=True, disable=json or not err_console.is_terminal)

    def on_iteration(t: int, rows: list[int], records: list[dict]) -> None:
        target = sum(r["target"] for r in records) / len(records)
        regv = sum(r["regularizer"] for r in records) / len(records)
        progress.update(task, advance=1,
                        live=f"reward {target:.4g}  {settings.reg} {regv:.4g}  "
                             f"({len(rows)} active)")

    with progress:
        task = progress.add_task(f"optimising {z.shape[0]} seed(s) ({settings.preset})",
                                 total=total, live="")
        res = run_optimize(backend, z, rewards, weights=reward_weight or None,
                           condition=condition, steps=steps, guidance=guidance,
                           settings=settings, stop_at=stop_at, keep_every=keep,
                           callback=on_iteration)
    refuse_non_finite(res.seeds, "the optimised seeds")

    n_steps = backend.default_steps if steps is None else steps
    records = [seed_record(res, i, n, str(targets[i] if to_dir else targets[0]))
               for i, n in enumerate(seed_names)]
    for i, target in enumerate(targets):
        meta = optimize_metadata(res, settings, backend, n_steps, condition, records[i])
        save_latent(target, res.seeds[i], meta, force=force)

    if render is not None:
        render.mkdir(parents=True, exist_ok=True)
        k = view_scale(backend)
        before_imgs = render_seeds(backend, z, condition, steps, guidance)
        after_imgs = render_seeds(backend, res.seeds, condition, steps, guidance)
        for i, n in enumerate(seed_names):
            save_image(render / f"{n}_before.png", before_imgs[i], force=force)
            save_image(render / f"{n}_after.png", after_imgs[i], force=force)
            traj = torch.stack([zt for _, zt in res.trajectory[i]])
            frames = render_seeds(backend, traj, condition, steps, guidance)
            save_image(render / f"{n}_trajectory.png",
                       make_grid(upscale(frames, k), nrow=frames.shape[0]), force=force)
            records[i]["images"] = [str(render / f"{n}_{w}.png")
                                    for w in ("before", "after", "trajectory")]
            records[i]["trajectory_iterations"] = [t for t, _ in res.trajectory[i]]

    if json:
        print_json({"settings": _settings_dict(settings), "rewards": res.rewards,
                    "weights": res.weights, "model": backend.name, "seeds": records,
                    "log": {n: res.log[i] for i, n in enumerate(seed_names)}})
        return
    print_table(f"optimize ({settings.preset}: {settings.optimizer.name} lr "
                f"{settings.optimizer.lr:g}, {settings.reg} x {settings.reg_weight:g}"
                f"{' rescaled' if settings.rescale else ''}, {settings.iters} iterations)",
                ["seed", "reward", "held-out", settings.reg, "norm z", "best it", "status"],
                [[r["seed"], f"{r['reward_before']:.4g} -> {r['reward_after']:.4g}",
                  f"{r['heldout_before']:.4g} -> {r['heldout_after']:.4g}",
                  f"{r['regularizer_before']:.4g} -> {r['regularizer_after']:.4g}",
                  f"{r['norm_z_before']:.2f} -> {r['norm_z_after']:.2f}",
                  r["best_iteration"], r["status"]] for r in records])
    for r in records:
        if r["status"].startswith("stopped"):
            # plain print: one line whatever the width, file names never read as Rich markup
            print(f"warning: seed {r['seed']}: {r['status']}", file=sys.stderr)


def _settings_dict(s: Any) -> dict:
    from dataclasses import asdict

    return asdict(s)


def _optimize_job(backend: Any, paths: list[str], output: Path, suffix: str,
                  reward: list[str], reward_weight: list[float] | None,
                  reward_model: Path | None, settings: Any, condition: Any,
                  steps: int | None, guidance: float | None, stop_at: float | None,
                  render: Path | None, batch_size: int, force: bool, json: bool,
                  launch: Any, shard: Any) -> None:
    """``optimize`` into a folder: the streaming job (:func:`latentgeo.cli.jobrun.optimize_job`)
    and its report."""
    from latentgeo.cli.common import err_console, print_json, print_table
    from latentgeo.cli.jobrun import optimize_job, warn
    from latentgeo.optimize import parse_reward

    rewards = [parse_reward(s, backend, None if reward_model is None else str(reward_model),
                            backend.device) for s in reward]
    result, header = optimize_job(
        backend, paths, output, suffix=suffix, rewards=rewards, reward_specs=reward,
        weights=reward_weight, settings=settings, condition=condition, steps=steps,
        guidance=guidance, stop_at=stop_at, render_dir=render, batch_size=batch_size,
        force=force, quiet=json, keep_rows=json, shard=shard, launch=launch)
    rep = result.report
    failed = [why if why.startswith(it.source) else f"{it.source}: {why}"
              for it, why in rep.failed]
    if failed and not rep.n_done and not rep.skipped and launch.world_size == 1 \
            and len(failed) == 1:
        raise InputError(failed[0])
    records = [r for r in result.rows if not r.get("skipped")]
    if json:
        print_json({"settings": _settings_dict(settings),
                    "rewards": header.get("rewards", list(reward)),
                    "weights": header.get("weights", reward_weight), "model": backend.name,
                    "seeds": [{k: v for k, v in r.items() if k != "log"} for r in records],
                    "log": {r["seed"]: r["log"] for r in records},
                    "resumed": [r["seed"] for r in result.rows if r.get("skipped")],
                    "shard": [shard.index, shard.count]})
    else:
        title = (f"optimize ({settings.preset}: {settings.optimizer.name} lr "
                 f"{settings.optimizer.lr:g}, {settings.reg} x {settings.reg_weight:g}"
                 f"{' rescaled' if settings.rescale else ''}, {settings.iters} iterations)"
                 + (f", shard {shard.index}/{shard.count}" if shard.count > 1 else "")
                 + (f"; {len(rep.skipped)} already there" if rep.skipped else ""))
        if records or not rep.n_done:
            print_table(title, ["seed", "reward", "held-out", settings.reg, "norm z",
                                "best it", "status"],
                        [[r["seed"], f"{r['reward_before']:.4g} -> {r['reward_after']:.4g}",
                          f"{r['heldout_before']:.4g} -> {r['heldout_after']:.4g}",
                          f"{r['regularizer_before']:.4g} -> {r['regularizer_after']:.4g}",
                          f"{r['norm_z_before']:.2f} -> {r['norm_z_after']:.2f}",
                          r["best_iteration"], r["status"]] for r in records])
        else:
            from latentgeo.cli.jobrun import summary_rows

            print_table(title, ["", "seeds"], summary_rows(result))
        for r in records:
            if r["status"].startswith("stopped"):
                err_console.print(f"warning: seed {r['seed']}: {r['status']}")
    if failed:
        for msg in failed:
            warn(f"skipped: {msg}")
        message = f"{len(failed)} seed(s) skipped, {rep.n_done} seed(s) written"
        if launch.world_size > 1:
            warn(f"warning: {message} (recorded in the manifest; exit 0 under the launcher)")
        else:
            raise InputError(message)
