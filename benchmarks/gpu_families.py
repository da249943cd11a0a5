"""Real checkpoints from the local Hugging Face cache: latentgeo's render against the diffusers
pipeline itself, and fixed-point against plain inversion, per model family.

For every model (ids below, or ``--model ID_OR_PATH``, repeatable) that is present in the local
cache (nothing is downloaded):

1. load it once with ``DiffusionPipeline.from_pretrained(local_files_only=True)`` and build
   latentgeo's adapter from the same networks (:data:`latentgeo.diffusion.loading.FAMILIES`),
   so both sides share one copy of the weights;
2. render one seed (drawn in float32, rounded to ``--dtype`` so both sides start from the same
   numbers) with latentgeo (:func:`latentgeo.diffusion.render`) and with the pipeline:
   SD/SDXL with ``DDIMScheduler.from_config(pipe.scheduler.config)`` and eta 0 (x0 clipping
   switched off if that config would clip, as latentgeo never clips), SD3 and FLUX unchanged,
   FLUX called with the packed seed; report the max abs difference of the images in [0, 1]. In
   bfloat16 the pipelines keep their latents in bfloat16 between steps and latentgeo keeps
   float32, so differences of order 1e-2 are expected there; ``--dtype float32`` should give
   <= 1e-4 (the CPU tests' bound);
3. encode the pipeline's image, invert it with fixed-point inversion (``--fixed-point``
   iterations per step) and with plain inversion, on the render's grid, at guidance 1 (FLUX-dev:
   its default embedded guidance), render both seeds back and report the latent RMS error of
   each round trip, their ratio and the network evaluations spent.

Models not in the cache, or that fail to load or run (a missing library, out of memory), are
listed with the reason. Without CUDA (``--device cuda``) every model is skipped, cleanly.

Usage (a GPU machine):
    python benchmarks/gpu_families.py --device cuda --dtype bfloat16 [--json results.json]
    python benchmarks/gpu_families.py --model black-forest-labs/FLUX.1-schnell --size 512
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

MODELS = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "stabilityai/stable-diffusion-3-medium-diffusers",
    "black-forest-labs/FLUX.1-schnell",
    "black-forest-labs/FLUX.1-dev",
)


def in_local_cache(spec: str) -> str | None:
    """None when ``spec`` is a local pipeline folder or its model_index.json is cached; else
    the reason to skip it."""
    path = Path(spec).expanduser()
    if path.exists():
        return None if (path / "model_index.json").is_file() else "folder has no model_index.json"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "huggingface_hub is not installed"
    found = try_to_load_from_cache(spec, "model_index.json")
    return None if isinstance(found, str) else "not in the local Hugging Face cache"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference(pipe: Any, backend: Any, z: torch.Tensor, prompt: str, steps: int,
              guidance: float) -> tuple[torch.Tensor, str]:
    """The pipeline's own render of seeds z (B, *latent_shape) in [0, 1] (float32, CPU) and a
    note on what was changed for it."""
    from diffusers import DDIMScheduler

    from latentgeo.diffusion.backends.flux import pack

    note = ""
    h, w = backend.image_size
    kw: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pt", "height": h,
                          "width": w, "num_images_per_prompt": z.shape[0]}
    latents = z.to(backend.device, backend.dtype)
    if backend.family in ("sd", "sdxl"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if pipe.scheduler.config.clip_sample:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
            note = "DDIM clip_sample switched off"
        kw.update(eta=0.0, guidance_scale=guidance)
    elif backend.family == "sd3":
        kw["guidance_scale"] = guidance
    elif backend.family == "flux":
        latents = pack(latents)
        if backend.guidance_embeds:
            kw["guidance_scale"] = guidance
    else:
        raise ValueError(f"no pipeline reference for family {backend.family}")
    with torch.no_grad():
        images = pipe(prompt, latents=latents, **kw).images
    return images.to("cpu", torch.float32), note


def run_one(spec: str, args: argparse.Namespace, dev: torch.device, dt: torch.dtype
            ) -> dict[str, Any]:
    """Load, render both ways, invert both ways; one result row."""
    from diffusers import DiffusionPipeline

    from latentgeo.diffusion import render
    from latentgeo.diffusion.inversion import invert, latent_rmse
    from latentgeo.diffusion.loading import (
        FAMILIES,
        check_pipeline_class,
        enable_offload,
        quiet_libraries,
    )
    from latentgeo.diffusion.sampler import sample

    quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=dt, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cls = type(pipe).__name__
    check_pipeline_class(cls, spec)
    module, constructor = FAMILIES[cls]
    build = getattr(importlib.import_module(f"latentgeo.diffusion.backends.{module}"),
                    constructor)
    backend = build(pipe, spec, dev, dt, height=args.size, width=args.size,
                    offload=args.offload)
    if args.offload:
        enable_offload(pipe, spec, dev)
    steps = args.steps or backend.default_steps
    guidance = backend.effective_guidance(args.prompt, None)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn((1, *backend.latent_shape), generator=g).to(dt).to(torch.float32)
    row: dict[str, Any] = {"model": spec, "family": backend.family, "pipeline": cls,
                           "size": "x".join(map(str, backend.image_size)), "steps": steps,
                           "guidance": guidance}

    sync(dev)
    start = time.perf_counter()
    ours = render(backend, z, condition=args.prompt, steps=steps)
    sync(dev)
    row["render_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ref, note = reference(pipe, backend, z, args.prompt, steps, guidance)
    sync(dev)
    row["diffusers_s"] = time.perf_counter() - start
    row["max_abs_diff"] = float((ours - ref).abs().max())
    row["note"] = note

    inv_guidance = None if backend.family == "flux" else 1.0
    model = backend.model_fn(args.prompt, inv_guidance)
    grid = backend.grid(steps)
    with torch.no_grad():
        x0 = backend.encode(ref.to(backend.device)).to(backend.device, torch.float32)
        start = time.perf_counter()
        fixed, info = invert(model, x0, grid, fixed_point_iters=args.fixed_point,
                             return_info=True)
        sync(dev)
        row["invert_s"] = time.perf_counter() - start
        plain = invert(model, x0, grid, fixed_point_iters=0)
        row["err_fixed"] = float(latent_rmse(sample(model, fixed, grid), x0).max())
        row["err_plain"] = float(latent_rmse(sample(model, plain, grid), x0).max())
    row["nfe_fixed"] = int(info.nfe.max())
    row["nfe_plain"] = steps
    row["ratio"] = row["err_plain"] / max(row["err_fixed"], 1e-300)
    row["status"] = "ok"
    del pipe, backend, model
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="id or local pipeline folder (repeatable; "
                   "default: the ids in MODELS)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", type=int, default=None, help="height = width in pixels "
                   "(default: each pipeline's)")
    p.add_argument("--steps", type=int, default=None, help="default: each model's")
    p.add_argument("--prompt", default="a photo of a red fox in the snow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed-point", type=int, default=3, help="fixed-point iterations per step")
    p.add_argument("--offload", action="store_true", help="model CPU offload (accelerate)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from latentgeo.diffusion.backends.base import parse_device, parse_dtype
    from latentgeo.errors import LatentgeoError

    console = Console()
    if not console.is_terminal:    # piped to a file: do not squeeze the table into 80 columns
        console = Console(width=160)
    rows: list[dict[str, Any]] = []
    try:
        dev, dt = parse_device(args.device), parse_dtype(args.dtype)
        device_problem = None
    except LatentgeoError as e:
        dev, dt, device_problem = None, None, str(e)
    for spec in args.model or MODELS:
        reason = in_local_cache(spec) or device_problem
        if reason is not None:
            rows.append({"model": spec, "status": f"skipped: {reason}"})
            continue
        try:
            rows.append(run_one(spec, args, dev, dt))
        except torch.cuda.OutOfMemoryError:
            rows.append({"model": spec, "status": "skipped: out of GPU memory (try --offload "
                         "or a smaller --size)"})
        except (LatentgeoError, ImportError, OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            rows.append({"model": spec, "status": f"skipped: {first[:160]}"})
            if args.json is not None:
                rows[-1]["traceback"] = traceback.format_exc()
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    table = Table(title=f"latentgeo vs diffusers, {args.device} {args.dtype}, prompt "
                        f"{args.prompt!r}, seed {args.seed}, fixed-point {args.fixed_point}")
    for c in ("model", "family", "size", "steps", "max |ours - diffusers|", "ours / diffusers s",
              "latent err fixed", "latent err plain", "plain / fixed", "NFE fixed / plain"):
        table.add_column(c, justify="left" if c in ("model", "family") else "right")
    measured = [r for r in rows if r["status"] == "ok"]
    for r in measured:
        table.add_row(r["model"], r["family"], r["size"], str(r["steps"]),
                      f"{r['max_abs_diff']:.2e}" + (f" ({r['note']})" if r["note"] else ""),
                      f"{r['render_s']:.1f} / {r['diffusers_s']:.1f}", f"{r['err_fixed']:.2e}",
                      f"{r['err_plain']:.2e}", f"{r['ratio']:.0f}x",
                      f"{r['nfe_fixed']} / {r['nfe_plain']}")
    if measured:
        console.print(table)
    for r in rows:
        if r["status"] != "ok":
            console.print(f"{r['model']}: {r['status']}", highlight=False)
    console.print(f"{len(measured)} model(s) measured, {len(rows) - len(measured)} skipped")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
