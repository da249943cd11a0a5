"""Latent files: one tensor per file, ``.pt`` or ``.safetensors``, written atomically.

Formats
-------
* ``.safetensors``: the tensor under key ``latent``; provenance (model, prompt, steps, method,
  ...) as string metadata.
* ``.pt``: ``{"latent": tensor, "metadata": {str: str}}`` written by ``torch.save``. A bare
  tensor is accepted on read. Always read with ``torch.load(weights_only=True)``: a pickle
  that tries to run code is refused, never executed (the refusal names what it tried to import).

What a latent file may hold (:func:`validate_latent`)
-----------------------------------------------------
One plain ``torch.Tensor`` (not a subclass such as ``nn.Parameter``), dense and strided (not
sparse), with no two elements sharing memory (not ``expand``-ed: a 2 kB file could otherwise
claim terabytes), of dtype float16, bfloat16, float32 or float64, with at least one dimension,
at most :data:`MAX_ELEMENTS` (2**28, 1 GiB as float32: 1,000 SDXL-sized or 16,000 SD-1.5-sized
seeds in one batch file) elements, and only finite values. It is returned detached and
contiguous. Anything else is refused with one line naming the file.

A *set* of latents is a directory of latent files (sorted by name, one latent each) or a single
file whose tensor has a leading batch dimension.

Writing
-------
Every file is written to a hidden temporary file beside the target, then published: without
``force`` by a hard link (which fails if the name exists, so of two concurrent writers exactly
one succeeds), where the file system has no hard links by creating the name exclusively and then
renaming over it; with ``force`` by an atomic rename. Any exception, ``KeyboardInterrupt`` and
the CLI's SIGTERM included, removes the temporary file. Inside :func:`all_or_nothing`, files are
published only when the whole block succeeds.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import pickletools
import re
import secrets
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from latentgeo.errors import (
    InputError,
    LatentgeoError,
    OutputExistsError,
    ShapeError,
    exists_error,
)
from latentgeo.limits import MAX_ELEMENTS

LATENT_SUFFIXES = (".pt", ".safetensors")
_KEY = "latent"
#: dtypes a latent may have.
LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64}


def is_latent_file(path: Path) -> bool:
    return path.suffix.lower() in LATENT_SUFFIXES


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _overlaps(x: torch.Tensor) -> bool:
    """True when two indices of ``x`` address the same memory (stride 0, ``expand``, or
    overlapping strides): dims of size > 1 sorted by stride must each step past the last."""
    dims = sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            return True
        span = stride * size
    return False


def validate_latent(x: object, name: str) -> torch.Tensor:
    """``x`` as a latent (module docstring), detached and contiguous; ``InputError`` naming
    ``name`` otherwise. Checks that cost memory (finiteness) run only after the size checks."""
    x = check_latent_layout(x, name).detach().contiguous()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(f"{name}: tensor has {bad} NaN or infinite entries")
    return x


def check_latent_layout(x: object, name: str) -> torch.Tensor:
    """The checks of :func:`validate_latent` that read no values (type, layout, device,
    dtype, size, overlap), so a memory-mapped batch file is checked without paging it in."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: holds {type(x).__name__}, not a tensor")
    if type(x) is not torch.Tensor:
        raise InputError(f"{name}: holds a {type(x).__name__}, not a plain tensor "
                         "(save tensor.detach())")
    if x.layout != torch.strided:
        raise InputError(f"{name}: holds a {str(x.layout).removeprefix('torch.')} tensor; a "
                         "latent is a dense tensor (save tensor.to_dense())")
    if x.device.type != "cpu":
        raise InputError(f"{name}: tensor is on device {x.device.type}, not in the file")
    if x.dtype not in LATENT_DTYPES:
        kind = "floating-point " if x.dtype.is_floating_point else ""
        raise InputError(f"{name}: tensor has {kind}dtype {_dtype_name(x.dtype)}; a latent is "
                         "float16, bfloat16, float32 or float64")
    if x.ndim == 0 or x.numel() == 0:
        raise InputError(f"{name}: tensor is empty (shape {tuple(x.shape)})")
    if x.numel() > MAX_ELEMENTS:
        raise InputError(f"{name}: tensor has {x.numel():,} elements (shape "
                         f"{tuple(x.shape)}), more than the {MAX_ELEMENTS:,} a latent file may "
                         "hold")
    if _overlaps(x):
        raise InputError(f"{name}: tensor of shape {tuple(x.shape)} repeats its memory (an "
                         "expanded view); save tensor.contiguous()")
    return x


def load_latent(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read one latent file; returns ``(tensor, metadata)``. Raises ``InputError`` with one
    line naming the file for anything that is not a latent (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a latent file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        x, metadata = _load_safetensors(path)
    elif suffix == ".pt":
        x, metadata = _load_pt(path)
    else:
        raise InputError(f"{path}: unknown latent file type '{path.suffix}' "
                         f"(expected {' or '.join(LATENT_SUFFIXES)})")
    return validate_latent(x, str(path)), metadata


def _load_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The header is checked (key, dtype, size) before any tensor memory is allocated."""
    from safetensors import safe_open

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                keys = list(f.keys())
                if _KEY not in keys:
                    raise InputError(f"{path}: safetensors file has no '{_KEY}' tensor "
                                     f"(keys: {', '.join(sorted(keys)) or 'none'})")
                sl = f.get_slice(_KEY)
                shape, dtype = tuple(sl.get_shape()), str(sl.get_dtype())
                numel = 1
                for s in shape:
                    numel *= int(s)
                if dtype not in _SAFETENSORS_DTYPES:
                    raise InputError(f"{path}: tensor has dtype {dtype}; a latent is float16, "
                                     "bfloat16, float32 or float64")
                if numel > MAX_ELEMENTS:
                    raise InputError(f"{path}: tensor has {numel:,} elements (shape {shape}), "
                                     f"more than the {MAX_ELEMENTS:,} a latent file may hold")
                x = f.get_tensor(_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    return x, metadata


def _load_pt(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": not for users
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except LatentgeoError:
        raise
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... never shown raw
        raise InputError(_pt_refusal(path, e)) from None
    return _unpack_pt(obj, path)


_GLOBAL_IN_TORCH_MESSAGE = re.compile(r"GLOBAL (\S+?)(?: was not| whose|[\s.,]*$)", re.M)


def _pt_refusal(path: Path, e: BaseException) -> str:
    """One line for a .pt file ``torch.load(weights_only=True)`` refused: what its pickle
    tried to import (read from the pickle's opcodes without running anything, or from torch's
    message), else why it is unreadable. Never torch's advice to load with weights_only=False:
    that is exactly what must not be done with such a file."""
    imports = _pickle_imports(path)
    if not imports:
        m = _GLOBAL_IN_TORCH_MESSAGE.search(str(e))
        imports = [m.group(1)] if m else []
    allowed = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
               "collections.OrderedDict", "torch.FloatStorage", "torch.HalfStorage",
               "torch.DoubleStorage", "torch.BFloat16Storage"}
    suspicious = [i for i in imports if i not in allowed and not i.startswith("torch.")]
    if suspicious:
        more = f" (and {len(suspicious) - 1} more)" if len(suspicious) > 1 else ""
        return (f"{path}: refused: its pickle tries to import {suspicious[0]}{more}, which a "
                "latent file never needs; latent files hold tensors only (nothing was run)")
    if re.search(r"Unsupported operand \d+", str(e)) or "magic number" in str(e):
        detail = "not a torch tensor file, or a corrupt one"
    elif "Weights only load failed" in str(e):
        detail = "it holds objects other than tensors"
    else:
        detail = _one_line(e)
    return f"{path}: not a readable latent file ({detail}; latent files hold tensors only)"


def _pickle_imports(path: Path, limit: int = 1 << 24) -> list[str]:
    """Names a pickle (bare, or ``data.pkl`` inside a torch zip file) would import, found by
    walking its opcodes with :mod:`pickletools` (nothing is executed). Empty when unreadable."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if pkl is None or z.getinfo(pkl).file_size > limit:
                    return []
                data = z.read(pkl)
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, ValueError):
        return []
    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # truncated or not a pickle: report what was seen so far
        pass
    return list(dict.fromkeys(names))


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
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# -- output names -------------------------------------------------------------------------------
def unique_names(stems: Sequence[str], reserved: Iterable[str] = ()) -> list[str]:
    """One output name per input, all distinct (compared case-insensitively, as on macOS and
    Windows file systems): each input keeps its stem unless an earlier input or a
    ``reserved`` name (``grid``, ``centroid`` ...) already has it; then it gets the first free
    ``STEM-2``, ``STEM-3``, ... that no input stem and no earlier name uses."""
    taken = {r.casefold() for r in reserved}
    all_stems = {s.casefold() for s in stems}
    names: list[str] = []
    for stem in stems:
        name = stem
        if name.casefold() in taken:
            k = 2
            while (f"{stem}-{k}".casefold() in taken or f"{stem}-{k}".casefold() in all_stems):
                k += 1
            name = f"{stem}-{k}"
        taken.add(name.casefold())
        names.append(name)
    return names


# -- writing ------------------------------------------------------------------------------------
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


#: errno values meaning "this file system cannot hard-link" (FAT, some network mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV,
                  errno.EMLINK, errno.EACCES}


def publish(tmp: str | Path, path: str | Path, force: bool = False) -> None:
    """Give the finished temporary file ``tmp`` the name ``path``.

    ``force``: atomic rename over whatever is there. Otherwise never replace: a hard link
    fails if ``path`` exists (two writers racing for one new name: exactly one wins); where
    hard links are unsupported, the name is first created exclusively, then renamed over.
    Raises ``OutputExistsError`` (:func:`~latentgeo.errors.exists_error`) when the name is
    taken; ``tmp`` is consumed on success.
    """
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists_error(path) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise exists_error(path) from None
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return
    with contextlib.suppress(OSError):
        os.unlink(tmp)


class _Pending:
    """Files written inside one :func:`all_or_nothing` block, not yet published."""

    def __init__(self) -> None:
        self.items: list[tuple[Path, Path, bool]] = []  # (tmp, target, force)
        self.dirs: list[Path] = []  # folders created for the outputs, outermost first


_PENDING: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar("latentgeo_pending",
                                                                           default=None)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Make every :func:`atomic_write` in the block part of one output: temporary files are
    written as the block runs and published (in order) only when it ends without an exception.
    If the block or a publication fails (or is interrupted), every temporary file is deleted,
    every file the block already published is removed again (a file it replaced under
    ``force`` is put back from a hard-linked backup), and folders it created are removed when
    empty: nothing of the output is left. Nested blocks join the outer one."""
    if _PENDING.get() is not None:
        yield
        return
    pending = _Pending()
    token = _PENDING.set(pending)
    published: list[tuple[Path, Path | None]] = []  # (target, backup of what it replaced)
    try:
        try:
            yield
        finally:
            _PENDING.reset(token)
        for tmp, target, force in pending.items:
            backup = _backup(target) if force else None
            try:
                publish(tmp, target, force)
            except BaseException:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        backup.unlink()
                raise
            published.append((target, backup))
    except BaseException:
        for tmp, _, _ in pending.items:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for target, backup in reversed(published):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink()
        for d in reversed(pending.dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    for _, backup in published:
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


def _backup(target: Path) -> Path | None:
    """A hidden hard link to the file ``target`` before it is replaced (None when there is no
    such file or the file system cannot link: then a rollback cannot restore it)."""
    if not target.is_file():
        return None
    bak = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        os.link(target, bak)
    except OSError:
        return None
    return bak


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first. A file where a
    folder is needed is an ``OutputExistsError`` naming it."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"{p}: is a file, not a folder, so nothing can be written "
                                "inside it")
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def atomic_write(path: Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then publish it as ``path``
    (:func:`publish`: never replacing without ``force``).

    A failure or interruption (any exception, including KeyboardInterrupt) leaves neither a
    partial ``path`` nor the temporary file behind. Inside :func:`all_or_nothing` the
    publication waits for the end of the block.
    """
    path = Path(path)
    if path.exists() and not force:
        raise exists_error(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a directory")
    pending = _PENDING.get()
    if pending is not None and any(t == path for _, t, _ in pending.items):
        raise OutputExistsError(f"{path}: two outputs of this run would have this name")
    created = _make_parents(path.parent)
    if pending is not None:
        pending.dirs.extend(created)
    try:
        tmp = _create_temp_beside(path)
    except OSError as e:
        raise _about(e, path) from None
    try:
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        # some writers (safetensors) recreate the file with their own mode: restore ours
        tmp.chmod(mode)
        if pending is not None:
            pending.items.append((tmp, path, force))
            return path
        publish(tmp, path, force)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if pending is None:
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            raise _about(e, path) from None
        raise
    return path


def _about(e: OSError, path: Path) -> OSError:
    """The OS error ``e`` about the output ``path`` (not its hidden temporary file)."""
    return type(e)(e.errno, e.strerror or str(e), str(path)) if e.errno else e


def save_latent(path: str | os.PathLike, x: torch.Tensor, metadata: dict[str, str] | None = None,
                force: bool = False) -> Path:
    """Write one tensor (any shape; a leading batch dimension makes it a set) atomically.

    Only latents :func:`load_latent` accepts are written (finite, float, within the size cap):
    anything else is refused before a file is created."""
    path = Path(path)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise InputError(f"{path}: output must end in {' or '.join(LATENT_SUFFIXES)}")
    try:
        x = validate_latent(x.detach().to("cpu").contiguous(), str(path))
    except InputError as e:
        raise LatentgeoError(f"not writing {e}") from None
    if suffix == ".safetensors":
        def write(tmp: Path) -> None:
            save_file({_KEY: x}, str(tmp), metadata=metadata)
    else:
        def write(tmp: Path) -> None:
            torch.save({_KEY: x, "metadata": metadata}, str(tmp))
    return atomic_write(path, write, force=force)


def latent_file_names(items: Iterable[str | os.PathLike]) -> list[str]:
    """Files stay as given; a directory becomes its latent files, sorted by name. Returned as
    path strings (what ``str(path)`` gives): a job over a folder of 10,000 seeds holds this
    list for the whole run, and a ``Path`` costs about 360 bytes more than its string."""
    names: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            base = str(p)  # names below are str(p / name), built without a Path per file
            with os.scandir(p) as entries:
                found = sorted((e.name if base == "." else os.path.join(base, e.name)
                                for e in entries if e.is_file()
                                and os.path.splitext(e.name)[1].lower() in LATENT_SUFFIXES),
                               key=os.path.normcase)
            if not found:
                raise InputError(f"{p}: directory has no latent files "
                                 f"({' or '.join(LATENT_SUFFIXES)})")
            names.extend(found)
        elif not p.exists():
            raise InputError(f"{p}: no such file or directory")
        else:
            names.append(str(p))
    if not names:
        raise InputError("no latent files given")
    return names


def expand_latent_paths(items: Iterable[str | os.PathLike]) -> list[Path]:
    """:func:`latent_file_names` as ``Path`` objects."""
    return [Path(n) for n in latent_file_names(items)]


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
            raise exists_error(clash[0])
    return [save_latent(t, row, metadata, force=force) for t, row in zip(targets, x)]
