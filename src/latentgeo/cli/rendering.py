"""Shared by every command that turns latents into pictures (``render``, ``--render`` on
``interpolate`` and ``centroid``, ``demo``): model loading from CLI options, the condition
(--prompt / --class), a Rich progress bar over the DDIM steps, and the files written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentgeo.cli.options import BatchSize, Render  # noqa: F401  (re-exported)
from latentgeo.errors import InputError, OutputExistsError

if TYPE_CHECKING:  # torch is imported when a command runs, never for --help
    import torch


def condition_from(backend: Any, prompt: str | None, class_label: int | None) -> Any:
    """The backend condition for --prompt / --class (both None: unconditional); the library's
    refusal reworded with the flag the user typed."""
    if prompt is not None and class_label is not None:
        raise InputError("give --prompt or --class, not both")
    if prompt is not None and backend.conditioning != "text":
        raise InputError(f"--prompt: {backend.name} is not a text-to-image model"
                         + (" (use --class)" if backend.conditioning == "class" else ""))
    if class_label is not None and backend.conditioning != "class":
        raise InputError(f"--class: {backend.name} takes no class"
                         + (" (use --prompt, not --class)" if backend.conditioning == "text"
                            else ""))
    condition = prompt if prompt is not None else class_label
    try:
        backend.check_condition(condition)
    except InputError as e:
        text = str(e).removeprefix(f"class {class_label}: ")
        raise InputError(f"--class {class_label}: {text}" if class_label is not None
                         else str(e)) from None
    return condition


def render_images(backend: Any, latents: torch.Tensor, condition: Any = None,
                  steps: int | None = None, guidance: float | None = None,
                  batch_size: int = 16, quiet: bool = False,
                  names: Sequence[str] | None = None) -> torch.Tensor:
    """Render (N, *latent_shape) with a Rich progress bar on stderr; returns (N, C, H, W).
    InputError (naming the seeds from ``names``) when any image has a NaN or infinite pixel,
    so no black image is ever written for a seed the model cannot render."""
    import torch

    from latentgeo.cli.common import progress_bar
    from latentgeo.diffusion.render import num_batches, render

    seeds = backend.check_seeds(latents)
    n_steps = backend.default_steps if steps is None else int(steps)
    total = num_batches(seeds.shape[0], batch_size) * n_steps
    with progress_bar(f"rendering {seeds.shape[0]} image(s)", total, quiet=quiet) as advance:
        images = render(backend, seeds, condition=condition, steps=n_steps, guidance=guidance,
                        batch_size=batch_size, callback=advance)
    bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
    if bool(bad.any()):
        which = ", ".join(names[i] for i in bad.nonzero().flatten().tolist()[:3]) if names \
            else f"{int(bad.sum())} seed(s)"
        raise InputError(f"rendering gives NaN or infinite pixels for {which} (seed entries "
                         f"up to {float(seeds.abs().max()):.3g}; a seed's are about 1); no "
                         "image was written")
    return images


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
    from latentgeo.diffusion import load_model
    from latentgeo.diffusion.backends.base import Backend
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
    images = render_images(backend, latents, condition, steps, guidance, batch_size, quiet,
                           names=names)
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
            "guidance": backend.effective_guidance(condition, guidance),
            "rendered": images}


# -- ``--render`` on interpolate and centroid ------------------------------------------------------


class RenderJob:
    """A ``--render DIR`` request, validated before any latent is computed or written.

    :func:`prepare_render` loads the model, checks the condition, the latent shape and that no
    image target exists (unless --force); :meth:`path` / :meth:`centroid` then render.
    """

    def __init__(self, out: Path, backend: Any, condition: Any, steps: int | None,
                 guidance: float | None, force: bool, quiet: bool) -> None:
        self.out, self.backend, self.condition = out, backend, condition
        self.steps, self.guidance, self.force, self.quiet = steps, guidance, force, quiet

    def _run(self, latents: torch.Tensor, names: Sequence[str], **kw: Any) -> dict[str, Any]:
        return render_to(self.out, latents, names, model=self.backend, steps=self.steps,
                         guidance=self.guidance, condition=self.condition, force=self.force,
                         quiet=self.quiet, **kw)

    def path(self, path: torch.Tensor) -> dict[str, Any]:
        """Interpolation (n, *shape): step000.png ... plus strip.png and path.gif."""
        names = [f"step{i:03d}" for i in range(path.shape[0])]
        info = self._run(path, names, strip=True)
        info.pop("rendered")
        return info

    def centroid(self, c: torch.Tensor, x: torch.Tensor, names: Sequence[str]
                 ) -> dict[str, Any]:
        """Centroid (*shape) and its inputs (N, *shape): centroid.png, one PNG per input and
        grid.png = [centroid | gap | inputs ...] in one row."""
        import torch

        from latentgeo.images import make_grid, save_image, upscale

        info = self._run(torch.cat([c[None], x]), ["centroid", *names])
        imgs = info.pop("rendered")
        k = view_scale(self.backend)
        gap = torch.full_like(imgs[0], 0.5)
        row = torch.cat([imgs[:1], gap[None], imgs[1:]])
        grid = self.out / "grid.png"
        save_image(grid, make_grid(upscale(row, k), nrow=row.shape[0]), force=self.force)
        info["grid"] = str(grid)
        return info


def prepare_render(out: Path | None, shape: Sequence[int], names: Sequence[str],
                   model: str = "bundled", device: str = "cpu", dtype: str = "float32",
                   prompt: str | None = None, class_label: int | None = None,
                   steps: int | None = None, guidance: float | None = None,
                   strip: bool = False, grid: bool = False, force: bool = False,
                   quiet: bool = False, height: int | None = None, width: int | None = None,
                   offload: bool = False) -> RenderJob | None:
    """Validate a ``--render`` request (None when ``out`` is None) before anything is written:
    the model loads, the condition fits it, latents of ``shape`` are its seeds, and none of
    ``NAME.png`` (plus strip.png/path.gif, grid.png) exists unless ``force``."""
    from latentgeo.diffusion import load_model
    from latentgeo.errors import ShapeError

    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--render {out}: exists and is not a directory")
    backend = load_model(model, device, dtype, height=height, width=width, offload=offload)
    if tuple(shape) != tuple(backend.latent_shape):
        raise ShapeError(f"--render: latents of shape {tuple(shape)} do not fit {backend.name}, "
                         f"whose seeds have shape {tuple(backend.latent_shape)}")
    condition = condition_from(backend, prompt, class_label)
    if len(set(names)) != len(names):
        raise InputError("--render: two latents share a name, so their images would clash")
    targets = [out / f"{n}.png" for n in names]
    targets += [out / "strip.png", out / "path.gif"] if strip else []
    targets += [out / "grid.png"] if grid else []
    check_targets(targets, force)
    return RenderJob(out, backend, condition, steps, guidance, force, quiet)
