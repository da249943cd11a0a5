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
    NumOptional,
    Offload,
    Output,
    Prompt,
    Render,
    Seed,
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

Seeds = Annotated[list[Path] | None, typer.Argument(
    help="Seed files (.pt/.safetensors) or directories of them (a file may hold a batch "
    "(N, ...)); not with --init.", show_default=False)]
RewardSpec = Annotated[list[str], typer.Option(
    "--reward", help="Reward KIND:ARGUMENT, repeatable: class:N (digit judge, bundled-style "
    "models), clip:TEXT (needs --reward-model), python:MODULE:FUNCTION, match:DIR "
    "(SeedSelect towards the images in DIR; --feature-model on SD-family models).")]
Init = Annotated[str | None, typer.Option(
    "--init", help="Start seeds made here instead of SEEDS files (with -n): random (with "
    "--seed), nao:DIR (invert the images in DIR, NAO centroid and the NAO paths towards "
    "them), centroid:METHOD:DIR (another centroid method, same paths).")]
FeatureModel = Annotated[Path | None, typer.Option(
    "--feature-model", help="Local transformers CLIPModel folder whose image features "
    "match:DIR compares (default on digit models: judge A's penultimate layer).")]
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
    "chose), or a published loop: reno, mpgr, dno, seedselect (30 iterations, 20 steps), "
    "nao-seedselect (5 iterations, guidance 1, for --init nao:DIR); every value "
    "overridable.")]
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
                         "python:MODULE:FUNCTION, match:DIR)")
    for spec in rewards:
        kind, sep, arg = spec.partition(":")
        if kind not in names.REWARD_KINDS or not sep:
            raise InputError(f"--reward {spec!r}: unknown reward (choose from class:N, "
                             "clip:TEXT, python:MODULE:FUNCTION, match:DIR)")
        if kind == "match":
            _check_folder(arg, f"--reward {spec}")
        if kind == "clip" and reward_model is None:
            raise InputError(f"--reward {spec!r} needs --reward-model PATH (a local "
                             "transformers CLIPModel folder)")
    if weights and len(weights) != len(rewards):
        raise InputError(f"--reward-weight: {len(weights)} weight(s) for {len(rewards)} "
                         "reward(s); give one per --reward, in order")
    if weights and not all(math.isfinite(w) for w in weights):
        raise InputError("--reward-weight: weights must be finite numbers")


def _check_folder(folder: str, what: str) -> None:
    """Before the model loads: ``folder`` exists, is a directory and holds image files (by
    suffix; whether they can be read is checked when they are read)."""
    from latentgeo.images import is_image_file

    p = Path(folder).expanduser()
    if not folder.strip():
        raise InputError(f"{what}: no folder given")
    if not p.exists():
        raise InputError(f"{what}: {folder}: no such directory")
    if not p.is_dir():
        raise InputError(f"{what}: {folder}: not a directory (give a folder of images)")
    if not any(q.is_file() and is_image_file(q) for q in p.iterdir()):
        raise InputError(f"{what}: {folder}: directory has no image files")


def _parse_init(init: str | None, num: int | None, seeds: list[Path] | None
                ) -> tuple[str, str | None] | None:
    """--init / -n / SEEDS checked together (torch-free): None (seed files) or (method,
    folder): method 'random' (folder None) or a centroid method."""
    if init is None:
        if num is not None:
            raise InputError("-n/--num needs --init (random, nao:DIR or centroid:METHOD:DIR)")
        if not seeds:
            raise InputError("give SEEDS files, or --init (random, nao:DIR, "
                             "centroid:METHOD:DIR) with -n N")
        return None
    if seeds:
        raise InputError(f"--init {init} makes the start seeds: give no SEEDS files with it")
    if num is None:
        raise InputError(f"--init {init} needs -n N (the number of start seeds)")
    kind, _, rest = init.partition(":")
    if init == "random":
        return "random", None
    if kind == "nao" and rest:
        method, folder = "nao", rest
    elif kind == "centroid" and ":" in rest:
        method, _, folder = rest.partition(":")
        if method not in names.CENTROID_METHODS:
            raise InputError(f"--init {init}: unknown centroid method {method!r} (choose from "
                             f"{', '.join(names.CENTROID_METHODS)})")
    else:
        raise InputError(f"--init {init}: expected random, nao:DIR or centroid:METHOD:DIR")
    _check_folder(folder, f"--init {init}")
    return method, folder


def optimize(
    output: Output,
    reward: RewardSpec,
    seeds: Seeds = None,
    init: Init = None,
    num: NumOptional = None,
    seed: Seed = 0,
    feature_model: FeatureModel = None,
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

    SeedSelect from a few examples (the NAO pipeline): --init nao:shots/ --reward match:shots/
    --preset nao-seedselect -n 20 -o seeds/ inverts the images in shots/ on the rendering
    grid, starts from their NAO centroid and points along the NAO paths towards them, and
    optimises each towards the examples' features and appearance (seeds named seed_000, ...).
    Unreadable example images are named and skipped (exit status 2 at the end).
    """
    init_spec = _parse_init(init, num, seeds)
    _check_specs(reward, reward_weight, reward_model)
    if feature_model is not None and not any(r.startswith("match:") for r in reward):
        raise InputError("--feature-model is the feature model of --reward match:DIR; give "
                         "that reward or drop it")
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
    from latentgeo.optimize import resolve

    # missing files fail before loading
    paths = [] if init_spec else latent_file_names([str(s) for s in seeds or []])
    if lr is not None and lr <= 0:
        raise InputError(f"--lr {lr}: must be positive")
    settings = resolve(preset, optimizer=optimizer, lr=lr, iters=iters, reg=reg,
                       reg_weight=reg_weight, rescale=rescale,
                       clip=None if clip is None else (math.inf if clip == 0 else clip))
    steps = settings.steps if steps is None else steps
    guidance = settings.guidance if guidance is None else guidance
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
    if init_spec is not None and not to_dir and num > 1:
        raise InputError(f"{output}: {num} seeds need an output directory (trailing '/')")
    backend = load_model(model, my_device, dtype, height=height, width=width, offload=offload)
    use_soft_tokens(backend, tokens, soft_tokens)
    condition = condition_from(backend, prompt, class_label)
    refs, ref_problems = _read_references(reward, init_spec, backend)
    rewards = _build_rewards(backend, reward, reward_model, feature_model, refs)
    start = None
    init_info: dict[str, Any] = {}
    if init_spec is not None:
        start, init_info = _start(backend, init, init_spec, num, seed, refs, steps, condition)
    extra = {"init": init, "init_seed": seed if init == "random" else None,
             "references": {d: r[2] for d, r in sorted(refs.items())}} if refs or init else {}
    if to_dir:
        _optimize_job(backend, paths, output, f".{fmt}", reward, reward_weight, rewards,
                      settings, condition, steps, guidance, stop_at, render, batch_size, force,
                      json, launch, my_shard, start, extra, init_info, ref_problems)
        return
    if start is not None:
        seed_names, z = list(start[0]), start[1]
    else:
        z, seed_names, problems = load_seeds([str(p) for p in paths], backend.latent_shape)
        if problems:
            more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
            raise InputError(problems[0] + more)
    if not to_dir and z.shape[0] > 1:
        raise InputError(f"{output}: {z.shape[0]} seeds need an output directory (trailing "
                         "'/')")
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
                    "log": {n: res.log[i] for i, n in enumerate(seed_names)},
                    **({"init": init_info} if init_info else {})})
        _refuse_skipped_references(ref_problems, len(records))
        return
    print_table(f"optimize ({settings.preset}: {settings.optimizer.name} lr "
                f"{settings.optimizer.lr:g}, {settings.reg} x {settings.reg_weight:g}"
                f"{' rescaled' if settings.rescale else ''}, {settings.iters} iterations)"
                + _init_note(init_info),
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
    _refuse_skipped_references(ref_problems, len(records))


def _read_references(reward: list[str], init_spec: tuple[str, str | None] | None,
                     backend: Any) -> tuple[dict[str, Any], list[str]]:
    """The example folders of match:DIR rewards and --init, each read once at the model's
    size: {folder: (images, paths, hash)} and the problem lines of unreadable files, each
    printed now as ``skipped: ...`` (the run goes on with the readable ones)."""
    from latentgeo import jobs
    from latentgeo.images import load_image_folder

    folders = [spec.partition(":")[2] for spec in reward if spec.partition(":")[0] == "match"]
    if init_spec is not None and init_spec[1] is not None:
        folders.append(init_spec[1])
    refs: dict[str, Any] = {}
    problems: list[str] = []
    for folder in dict.fromkeys(folders):
        images, files, bad = load_image_folder(folder, backend.image_size,
                                               backend.image_channels)
        refs[folder] = (images, [str(f) for f in files], jobs.tensor_hash(images))
        problems.extend(bad)
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)
    return refs, problems


def _refuse_skipped_references(problems: list[str], written: int) -> None:
    if problems:
        raise InputError(f"{len(problems)} example image(s) skipped, {written} seed(s) "
                         "written")


def _build_rewards(backend: Any, reward: list[str], reward_model: Path | None,
                   feature_model: Path | None, refs: dict[str, Any]) -> list[Any]:
    from latentgeo.optimize import match_reward, parse_reward

    out = []
    for spec in reward:
        kind, _, arg = spec.partition(":")
        if kind == "match":
            if feature_model is None and (backend.family != "pixel"
                                          or backend.image_channels != 1):
                raise InputError(f"--reward {spec}: {backend.name} is a {backend.family} "
                                 "model; give --feature-model PATH (a local transformers "
                                 "CLIPModel folder) for the image features")
            out.append(match_reward(backend, refs[arg][0],
                                    None if feature_model is None else str(feature_model),
                                    spec=spec, device=backend.device))
        else:
            out.append(parse_reward(spec, backend,
                                    None if reward_model is None else str(reward_model),
                                    backend.device))
    return out


def _start(backend: Any, init: str, init_spec: tuple[str, str | None], num: int, seed: int,
           refs: dict[str, Any], steps: int | None, condition: Any
           ) -> tuple[tuple[list[str], Any, str], dict[str, Any]]:
    """The start seeds of --init: ((keys, seeds, label), a JSON-able summary)."""
    from latentgeo.optimize import start_seeds

    method, folder = init_spec
    images, files = (None, []) if folder is None else refs[folder][:2]
    if folder is not None and images.shape[0] < 2:
        raise InputError(f"--init {init}: {images.shape[0]} readable example image; a "
                         "centroid and its paths need at least 2")
    st = start_seeds(backend, images, num, method, steps=steps, guidance=1.0,
                     condition=condition, seed=seed)
    width = max(3, len(str(num - 1)))
    keys = [f"seed_{i:0{width}d}" for i in range(num)]
    info = {"init": init, "method": method, "n": num, "references": files,
            "inversion_nfe": st.nfe, "steps": st.steps,
            "path": st.path, "fraction": st.fraction}
    if folder is None:
        info["seed"] = seed
    return (keys, st.seeds, f"--init {init}"), info


def _init_note(info: dict[str, Any]) -> str:
    if not info:
        return ""
    if info["method"] == "random":
        return f"; start: {info['n']} random seeds (--seed {info['seed']})"
    return (f"; start: {info['method']} centroid + paths of {len(info['references'])} "
            f"examples (inversion: {info['inversion_nfe']} network evaluations)")


def _settings_dict(s: Any) -> dict:
    from dataclasses import asdict

    return asdict(s)


def _optimize_job(backend: Any, paths: list[str], output: Path, suffix: str,
                  reward: list[str], reward_weight: list[float] | None,
                  rewards: list[Any], settings: Any, condition: Any,
                  steps: int | None, guidance: float | None, stop_at: float | None,
                  render: Path | None, batch_size: int, force: bool, json: bool,
                  launch: Any, shard: Any, start: Any = None,
                  extra: dict[str, Any] | None = None, init_info: dict[str, Any] | None = None,
                  ref_problems: list[str] | None = None) -> None:
    """``optimize`` into a folder: the streaming job (:func:`latentgeo.cli.jobrun.optimize_job`)
    and its report."""
    from latentgeo.cli.common import err_console, print_json, print_table
    from latentgeo.cli.jobrun import optimize_job, warn

    result, header = optimize_job(
        backend, paths, output, suffix=suffix, rewards=rewards, reward_specs=reward,
        weights=reward_weight, settings=settings, condition=condition, steps=steps,
        guidance=guidance, stop_at=stop_at, render_dir=render, batch_size=batch_size,
        force=force, quiet=json, keep_rows=json, shard=shard, launch=launch, start=start,
        extra_options=extra)
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
                    "shard": [shard.index, shard.count],
                    **({"init": init_info} if init_info else {})})
    else:
        title = (f"optimize ({settings.preset}: {settings.optimizer.name} lr "
                 f"{settings.optimizer.lr:g}, {settings.reg} x {settings.reg_weight:g}"
                 f"{' rescaled' if settings.rescale else ''}, {settings.iters} iterations)"
                 + (f", shard {shard.index}/{shard.count}" if shard.count > 1 else "")
                 + (f"; {len(rep.skipped)} already there" if rep.skipped else "")
                 + _init_note(init_info or {}))
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
    _refuse_skipped_references(ref_problems or [], rep.n_done)
