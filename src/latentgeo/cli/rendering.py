"""Shared by every command that turns latents into pictures (``render``, ``--render`` on
``interpolate`` and ``centroid``, ``demo``): model loading from CLI options, the condition
(--prompt / --class), a Rich progress bar over the DDIM steps, and the files written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from latentgeo.errors import InputError, OutputExistsError

Render = Annotated[Path | None, typer.Option(
    "--render", help="Also render the latents with --model into this folder (PNGs).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1,
                                        help="Seeds per network call.")]


def condition_from(backend: Any, prompt: str | None, class_label: int | None) -> Any:
    """The backend condition for --prompt / --class (both None: unconditional)."""
    if prompt is not None and class_label is not None:
        raise InputError("give --prompt or --class, not both")
    condition = prompt if prompt is not None else class_label
    backend.check_condition(condition)
    return condition


def render_images(backend: Any, latents: torch.Tensor, condition: Any = None,
                  steps: int | None = None, guidance: float | None = None,
                  batch_size: int = 16, quiet: bool = False) -> torch.Tensor:
    """Render (N, *latent_shape) with a Rich progress bar on stderr; returns (N, C, H, W)."""
    from latentgeo.backend import num_batches, render
    from latentgeo.cli.common import progress_bar

    seeds = backend.check_seeds(latents)
    n_steps = backend.default_steps if steps is None else int(steps)
    total = num_batches(seeds.shape[0], batch_size) * n_steps
    with progress_bar(f"rendering {seeds.shape[0]} image(s)", total, quiet=quiet) as advance:
        return render(backend, seeds, condition=condition, steps=n_steps, guidance=guidance,
                      batch_size=batch_size, callback=advance)


def view_scale(backend: Any) -> int:
    """Integer upscale for viewing grids/strips/GIFs: small images (the 32x32 digits) are
    shown at >= 128 px with nearest-neighbour pixels; full-size images are left alone."""
    side = min(backend.image_size)
    return max(1, 128 // side) if side < 128 else 1


def check_targets(paths: Sequence[Path], force: bool) -> None:
    """Refuse before writing anything when a target exists and --force is not given."""
    if force:
        return
    for p in paths:
        if p.exists():
            raise OutputExistsError(f"{p}: exists (use --force to overwrite)")


def render_to(out_dir: str | Path, latents: torch.Tensor, names: Sequence[str],
              model: Any = "bundled", device: str = "cpu", dtype: str = "float32",
              steps: int | None = None, guidance: float | None = None,
              condition: Any = None, strip: bool = False, grid: bool = False,
              grid_cols: int | None = None, force: bool = False, batch_size: int = 16,
              quiet: bool = False, prefix: str = "") -> dict[str, Any]:
    """Render latents (N, *latent_shape) to ``out_dir``: one PNG per latent (``NAME.png``),
    plus, with ``strip``, ``{prefix}strip.png`` (one row) and ``{prefix}path.gif`` (animated,
    a -> b -> a), and with ``grid``, ``{prefix}grid.png`` (``grid_cols`` columns).

    ``model`` is a spec ('bundled', id, path) or an already loaded Backend. All targets are
    checked before anything is written. Returns {"images": [...], "strip": ..., "gif": ...,
    "grid": ..., "model": name, "steps": n, "guidance": g}.
    """
    from latentgeo.backend import Backend, load_model
    from latentgeo.images import make_grid, save_gif, save_image, upscale

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    names = [str(n) for n in names]
    if len(names) != latents.shape[0]:
        raise InputError(f"{len(names)} names for {latents.shape[0]} latents")
    if len(set(names)) != len(names):
        raise InputError("latent names must be unique to name their images")
    image_paths = [out / f"{n}.png" for n in names]
    extra = {}
    if strip:
        extra["strip"] = out / f"{prefix}strip.png"
        extra["gif"] = out / f"{prefix}path.gif"
    if grid:
        extra["grid"] = out / f"{prefix}grid.png"
    check_targets([*image_paths, *extra.values()], force)

    backend = model if isinstance(model, Backend) else load_model(model, device, dtype)
    images = render_images(backend, latents, condition, steps, guidance, batch_size, quiet)
    for p, img in zip(image_paths, images):
        save_image(p, img, force=force)
    k = view_scale(backend)
    if strip:
        save_image(extra["strip"], make_grid(upscale(images, k), nrow=images.shape[0]),
                   force=force)
        save_gif(extra["gif"], upscale(images, k), force=force)
    if grid:
        save_image(extra["grid"], make_grid(upscale(images, k), nrow=grid_cols), force=force)
    return {"images": [str(p) for p in image_paths],
            **{key: str(p) for key, p in extra.items()},
            "model": backend.name,
            "steps": backend.default_steps if steps is None else int(steps),
            "guidance": backend.default_guidance if guidance is None else float(guidance),
            "rendered": images}
