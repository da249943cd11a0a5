"""Images at the edge of latentgeo: tensors <-> PIL, PNG in and out, grids, strips, GIFs.

Conventions: an image tensor is float32 (C, H, W) (a batch (B, C, H, W)) in [0, 1] with C = 1
(grey) or 3 (RGB). Writing quantises with round(255 x). Every file is written atomically through
:func:`latentgeo.io.atomic_write` (temp file + rename; ``force`` to overwrite).

Conversion rule of :func:`load_image` (what a model of ``size`` x ``channels`` receives)
--------------------------------------------------------------------------------------
1. Decode with Pillow; anything it cannot decode fully (not an image, truncated, corrupt) is an
   :class:`~latentgeo.errors.InputError` naming the file. Images smaller than ``min_side``
   pixels on a side are refused (default 8: scikit-learn's 8x8 digits are the smallest we use).
2. 16-bit greyscale (``I;16``) is scaled by 65535 (full precision, not clipped at 255);
   32-bit ``I`` by 65535 when its maximum exceeds 255, else by 255; float ``F`` is taken as
   [0, 1]. Palette images are expanded.
3. Transparency (RGBA, LA, palette with transparency) is composited onto a flat background:
   **black for 1-channel models** (MNIST digits are white on black, so a digit drawn on a
   transparent canvas lands on the background the model knows), **white for 3-channel models**
   (the usual convention for photos and drawings). Override with ``background=``.
4. Channels: grey models get ITU-R 601-2 luma (Pillow ``convert("L")``); RGB models get grey
   replicated to three channels.
5. Geometry: the image is centre-cropped to the model's aspect ratio, then resized to
   (H, W) with Lanczos filtering (done in float on each channel, so 16-bit precision survives).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from latentgeo.errors import InputError, ShapeError
from latentgeo.io import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# -- tensor <-> PIL -------------------------------------------------------------------------------
def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W) or (H, W, 3) uint8 array, round(255 x) clamped."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ShapeError(f"image tensor must be (1 or 3, H, W), got {tuple(img.shape)}")
    a = (img.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8)
    a = a.numpy()
    return a[0] if a.shape[0] == 1 else np.ascontiguousarray(a.transpose(1, 2, 0))


def to_pil(img: torch.Tensor):
    """(C, H, W) float in [0, 1] -> PIL image (mode L for C = 1, RGB for C = 3)."""
    from PIL import Image

    a = to_uint8(img)
    return Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB")


def from_pil(pil, channels: int | None = None) -> torch.Tensor:
    """PIL image (L, RGB, or anything Pillow converts) -> (C, H, W) float32 in [0, 1].

    ``channels`` None keeps grey as 1 channel and everything else as RGB.
    """
    if channels is None:
        channels = 1 if pil.mode in ("1", "L", "I", "I;16", "F") else 3
    a = _to_float_array(pil, channels, background=0.0 if channels == 1 else 1.0)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


# -- reading --------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, size: int | tuple[int, int], channels: int,
               background: float | None = None, min_side: int = 8) -> torch.Tensor:
    """Read an image file as float32 (channels, H, W) in [0, 1], converted by the rule in the
    module docstring. ``size``: H = W = size, or (H, W). InputError names the file on failure.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an image file")
    try:
        with warnings.catch_warnings():
            # a decompression bomb (more pixels than Pillow's MAX_IMAGE_PIXELS) is refused,
            # not announced in a multi-line warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as pil:
                pil.load()
                pil = pil.copy()
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path}: image has more than {Image.MAX_IMAGE_PIXELS:,} pixels "
                         "(Pillow's limit against decompression bombs)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: corrupt or truncated image ({_one_line(e)})") from None
    if min(pil.size) < min_side:
        raise InputError(f"{path}: image is {pil.size[0]}x{pil.size[1]} pixels, smaller than "
                         f"the minimum {min_side}x{min_side}")
    if background is None:
        background = 0.0 if channels == 1 else 1.0
    raw = np.asarray(pil) if pil.mode == "F" else None  # float pixels: check before clipping
    a = _to_float_array(pil, channels, background)          # (H0, W0, C) float32
    bad = int((~np.isfinite(raw if raw is not None else a)).sum())
    if bad:
        raise InputError(f"{path}: image has {bad} pixel value(s) that are not numbers (NaN or "
                         "infinite)")
    a = _center_crop(a, h / w)
    return _resize(a, h, w)


def load_images(paths: Sequence[str | os.PathLike], size: int | tuple[int, int], channels: int,
                background: float | None = None) -> tuple[torch.Tensor, list[str]]:
    """Read several images as (N, channels, H, W); raises on the first bad file."""
    imgs = [load_image(p, size, channels, background) for p in paths]
    if not imgs:
        raise InputError("no image files given")
    return torch.stack(imgs), [Path(p).stem for p in paths]


def load_image_folder(folder: str | os.PathLike, size: int | tuple[int, int], channels: int,
                      background: float | None = None
                      ) -> tuple[torch.Tensor, list[Path], list[str]]:
    """Every image file of ``folder`` (by suffix, sorted by name) read by :func:`load_image`:
    (images (N, channels, H, W), their paths, one problem line per unreadable file, which is
    skipped). InputError naming the folder when it is missing, not a folder, holds no image
    files or none of them can be read (then the problems are in the message's count)."""
    p = Path(folder).expanduser()
    if not p.exists():
        raise InputError(f"{folder}: no such directory")
    if not p.is_dir():
        raise InputError(f"{folder}: not a directory (give a folder of images)")
    files = sorted(q for q in p.iterdir() if q.is_file() and is_image_file(q))
    if not files:
        raise InputError(f"{folder}: directory has no image files")
    images, paths, problems = [], [], []
    for q in files:
        try:
            images.append(load_image(q, size, channels, background))
            paths.append(q)
        except InputError as e:
            problems.append(str(e))
    if not images:
        raise InputError(f"{folder}: none of its {len(files)} image file(s) could be read "
                         f"({problems[0]})")
    return torch.stack(images), paths, problems


def _to_float_array(pil, channels: int, background: float) -> np.ndarray:
    """Any PIL image -> (H, W, channels) float32 in [0, 1], transparency composited."""
    mode = pil.mode
    if mode == "P":
        pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
        mode = pil.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(pil, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        grey = np.clip(a / hi, 0.0, 1.0)[..., None]
        alpha = None
    elif mode == "F":
        grey = np.clip(np.asarray(pil, dtype=np.float64), 0.0, 1.0)[..., None]
        alpha = None
    elif mode in ("1", "L"):
        grey = np.asarray(pil.convert("L"), dtype=np.float64)[..., None] / 255.0
        alpha = None
    elif mode in ("LA", "La", "PA"):
        la = np.asarray(pil.convert("LA"), dtype=np.float64) / 255.0
        grey, alpha = la[..., :1], la[..., 1:]
    else:
        has_alpha = mode in ("RGBA", "RGBa") or "A" in mode
        rgba = np.asarray(pil.convert("RGBA" if has_alpha else "RGB"), dtype=np.float64) / 255.0
        grey, alpha = rgba[..., :3], (rgba[..., 3:] if has_alpha else None)
    if alpha is not None:
        grey = grey * alpha + background * (1.0 - alpha)
    c = grey.shape[-1]
    if channels == 3 and c == 1:
        grey = np.repeat(grey, 3, axis=-1)
    elif channels == 1 and c == 3:
        # ITU-R 601-2 luma, as Pillow's convert("L").
        grey = grey @ np.array([0.299, 0.587, 0.114])[:, None]
    return grey.astype(np.float32)


def _center_crop(a: np.ndarray, aspect: float) -> np.ndarray:
    """Crop (H, W, C) to height / width = aspect around the centre."""
    h, w = a.shape[:2]
    if abs(h / w - aspect) < 1e-9:
        return a
    if h / w > aspect:
        nh = max(1, round(w * aspect))
        top = (h - nh) // 2
        return a[top:top + nh]
    nw = max(1, round(h / aspect))
    left = (w - nw) // 2
    return a[:, left:left + nw]


def _resize(a: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(H0, W0, C) float32 -> (C, h, w) float32 tensor via Lanczos per channel (mode F)."""
    from PIL import Image

    if a.shape[:2] != (h, w):
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., k]), mode="F")
                            .resize((w, h), Image.Resampling.LANCZOS)) for k in range(a.shape[2])]
        a = np.stack(chans, axis=-1)
    return torch.from_numpy(np.clip(a, 0.0, 1.0).astype(np.float32)).permute(2, 0, 1).contiguous()


def is_image_file(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


# -- grids --------------------------------------------------------------------------------------
def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2,
              pad_value: float = 0.5) -> torch.Tensor:
    """Tile a batch (N, C, H, W) into one image (C, rows (H + p) + p, nrow (W + p) + p).

    Row-major: image i goes to row i // nrow, column i % nrow; missing cells keep ``pad_value``.
    ``nrow`` None = ceil(sqrt(N)) columns. Grey and RGB batches may not be mixed.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ShapeError(f"grid input must be a non-empty batch (N, C, H, W), "
                         f"got {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = nrow or int(np.ceil(np.sqrt(n)))
    ncol = max(1, min(ncol, n))
    nrows = -(-n // ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding),
                      float(pad_value), dtype=torch.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i].to("cpu", torch.float32)
    return grid


def upscale(img: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of (C, H, W) or (N, C, H, W) by an integer ``factor``
    (for viewing 32x32 digits; pixels stay crisp)."""
    if factor <= 1:
        return img
    return img.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def label_rows(grid: torch.Tensor, labels: Sequence[str], cell_height: int, padding: int = 2,
               width: int | None = None) -> torch.Tensor:
    """Prepend a left margin with one text label per grid row (Pillow's built-in font, white
    on the grid's border colour). grid (C, H, W) -> (C, H, margin + W); row i is centred on
    padding + i (cell_height + padding) + cell_height / 2."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=max(10, min(16, cell_height // 4)))
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    c, h, _ = grid.shape
    margin = width or (max(int(font.getlength(t)) for t in labels) + 8 if labels else 0)
    canvas = Image.new("L", (margin, h), color=round(float(grid[0, 0, 0]) * 255))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        y = padding + i * (cell_height + padding) + cell_height // 2
        draw.text((4, y), text, fill=255, font=font, anchor="lm")
    side = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None].expand(c, h, -1)
    return torch.cat([side, grid], dim=2)


# -- writing --------------------------------------------------------------------------------------
def save_image(path: str | os.PathLike, img: torch.Tensor, force: bool = False) -> Path:
    """Write one image (C, H, W) in [0, 1] as 8-bit PNG (format from the suffix), atomically."""
    path = Path(path)
    pil = to_pil(img)
    fmt = _format_for(path)
    return atomic_write(path, lambda tmp: pil.save(tmp, format=fmt), force=force)


def save_gif(path: str | os.PathLike, frames: torch.Tensor, duration_ms: int = 120,
             bounce: bool = True, force: bool = False) -> Path:
    """Write an animated, endlessly looping GIF of ``frames`` (N, C, H, W) in [0, 1].

    ``bounce`` plays the frames forward then backward (a -> b -> a), the natural loop for an
    interpolation path. Each frame shows ``duration_ms`` milliseconds.
    """
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ShapeError(f"GIF frames must be a non-empty batch (N, C, H, W), "
                         f"got {tuple(frames.shape)}")
    pils = [to_pil(f) for f in frames]
    if bounce and len(pils) > 2:
        pils = pils + pils[-2:0:-1]
    if len(pils) == 1:
        pils = pils * 2

    def write(tmp: Path) -> None:
        pils[0].save(tmp, format="GIF", save_all=True, append_images=pils[1:],
                     duration=int(duration_ms), loop=0, disposal=1, optimize=False)

    return atomic_write(Path(path), write, force=force)


def _format_for(path: Path) -> str:
    suffix = path.suffix.lower()
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF",
               ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
    if suffix not in formats:
        raise InputError(f"{path}: unknown image type '{path.suffix}' (use .png)")
    return formats[suffix]


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
