"""Latent files: one tensor per file, ``.pt`` or ``.safetensors``, written atomically.

Formats
-------
* ``.safetensors``: the tensor under key ``latent``; provenance (model, prompt, steps, method,
  ...) as string metadata.
* ``.pt``: ``{"latent": tensor, "metadata": {str: str}}`` written by ``torch.save``. A bare
  tensor is accepted on read. Always read with ``torch.load(weights_only=True)``: a pickle
  that tries to run code is refused, never executed.

A *set* of latents is a directory of latent files (sorted by name, one latent each) or a single
file whose tensor has a leading batch dimension.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentgeo.errors import InputError, OutputExistsError, ShapeError

LATENT_SUFFIXES = (".pt", ".safetensors")
_KEY = "latent"


def is_latent_file(path: Path) -> bool:
    return path.suffix.lower() in LATENT_SUFFIXES


def validate_latent(x: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse tensors no latent can be: non-float, empty, 0-d, or with NaN/inf entries."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: holds {type(x).__name__}, not a tensor")
    if not torch.is_floating_point(x):
        raise InputError(f"{name}: tensor has dtype {x.dtype}, expected a floating-point latent")
    if x.ndim == 0 or x.numel() == 0:
        raise InputError(f"{name}: tensor is empty (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: tensor has {bad} NaN or infinite entries")
    return x


def load_latent(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read one latent file; returns ``(tensor, metadata)``. Raises ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a latent file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
        if _KEY not in tensors:
            raise InputError(f"{path}: safetensors file has no '{_KEY}' tensor "
                             f"(keys: {', '.join(sorted(tensors)) or 'none'})")
        x = tensors[_KEY]
    elif suffix == ".pt":
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... all mean "corrupt"
            raise InputError(f"{path}: not a safe, readable torch file ({_one_line(e)})") from None
        x, metadata = _unpack_pt(obj, path)
    else:
        raise InputError(f"{path}: unknown latent file type '{path.suffix}' "
                         f"(expected {' or '.join(LATENT_SUFFIXES)})")
    return validate_latent(x, str(path)), metadata


def _unpack_pt(obj: object, path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    if isinstance(obj, torch.Tensor):
        return obj, {}
    if isinstance(obj, dict) and _KEY in obj:
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InputError(f"{path}: 'metadata' is not a dict")
        return obj[_KEY], {str(k): str(v) for k, v in metadata.items()}
    raise InputError(f"{path}: expected a tensor or a dict with a '{_KEY}' tensor")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _create_temp_beside(path: Path) -> Path:
    """Create an empty, uniquely named hidden file next to ``path`` and return its path.

    Unlike ``tempfile.mkstemp`` (always 0600) the file is created with mode 0666, so the
    kernel applies the process umask and its mode is the one any new file gets.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary file name")


def atomic_write(path: Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure or interruption (any exception, including KeyboardInterrupt) leaves neither a
    partial ``path`` nor the temporary file behind.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: exists (use --force to overwrite)")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path}: is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_beside(path)
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        # some writers (safetensors) recreate the file with their own mode: restore ours
        tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def save_latent(path: str | os.PathLike, x: torch.Tensor, metadata: dict[str, str] | None = None,
                force: bool = False) -> Path:
    """Write one tensor (any shape; a leading batch dimension makes it a set) atomically."""
    path = Path(path)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    x = x.detach().to("cpu").contiguous()
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        def write(tmp: Path) -> None:
            save_file({_KEY: x}, str(tmp), metadata=metadata)
    elif suffix == ".pt":
        def write(tmp: Path) -> None:
            torch.save({_KEY: x, "metadata": metadata}, str(tmp))
    else:
        raise InputError(f"{path}: output must end in {' or '.join(LATENT_SUFFIXES)}")
    return atomic_write(path, write, force=force)


def expand_latent_paths(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Files stay as given; a directory becomes its latent files, sorted by name."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and is_latent_file(q))
            if not found:
                raise InputError(f"{p}: directory has no latent files "
                                 f"({' or '.join(LATENT_SUFFIXES)})")
            paths.extend(found)
        elif not p.exists():
            raise InputError(f"{p}: no such file or directory")
        else:
            paths.append(p)
    if not paths:
        raise InputError("no latent files given")
    return paths


def load_latent_set(items: Sequence[str | os.PathLike]) -> tuple[torch.Tensor, list[str]]:
    """Read a set of latents as (N, *shape) plus one name per row.

    One file given alone is a batch (its leading dimension indexes the set); otherwise every
    file (directories expanded) holds one latent, and all must share a shape.
    """
    paths = expand_latent_paths(items)
    if len(paths) == 1 and not Path(items[0]).is_dir():
        x, _ = load_latent(paths[0])
        if x.ndim < 2:
            raise ShapeError(f"{paths[0]}: a single file must hold a batch (N, ...), "
                             f"got shape {tuple(x.shape)}")
        return x, [f"{paths[0].stem}[{i}]" for i in range(x.shape[0])]
    latents, names = [], []
    for p in paths:
        x, _ = load_latent(p)
        if latents and x.shape != latents[0].shape:
            raise ShapeError(f"{p}: shape {tuple(x.shape)} differs from "
                             f"{paths[0]}'s {tuple(latents[0].shape)}")
        latents.append(x)
        names.append(p.stem)
    return torch.stack(latents), names


def output_is_dir(out: str | os.PathLike) -> bool:
    """``-o dir/`` (trailing slash, existing directory, or no latent suffix) means a directory."""
    s = str(out)
    p = Path(s)
    return s.endswith(("/", os.sep)) or p.is_dir() or not is_latent_file(p)


def save_latent_set(out: str | os.PathLike, x: torch.Tensor, names: Sequence[str] | None = None,
                    metadata: dict[str, str] | None = None, force: bool = False,
                    suffix: str = ".pt") -> list[Path]:
    """Write a set (N, *shape): one batch file, or one file per row into a directory.

    Every target is checked before anything is written, so a refusal writes nothing.
    """
    if not output_is_dir(out):
        return [save_latent(out, x, metadata, force=force)]
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"{root}: exists and is not a directory")
    names = list(names) if names is not None else [f"{i:03d}" for i in range(x.shape[0])]
    if len(names) != x.shape[0]:
        raise ShapeError(f"{len(names)} names for {x.shape[0]} latents")
    targets = [root / f"{name}{suffix}" for name in names]
    if not force:
        clash = [t for t in targets if t.exists()]
        if clash:
            raise OutputExistsError(f"{clash[0]}: exists (use --force to overwrite)")
    return [save_latent(t, row, metadata, force=force) for t, row in zip(targets, x)]
