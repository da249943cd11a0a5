"""The streaming job layer under ``invert`` and ``render``: many inputs, one output file each,
split over processes, resumable after any crash.

A job is a list of :class:`Item` (one input each, with a unique ``key`` that names its output).
The rules, each a small function below:

1. **Order and shards.** Items are sorted by key and this process takes the contiguous block
   :meth:`latentgeo.launch.Shard.block` of them; no two shards share an item, so no rank ever
   writes another's file and no collective is needed to finish.
2. **Streaming.** Items are loaded ``batch_size`` at a time (:func:`chunks`), processed and each
   output written as soon as it exists: memory is bounded by the batch, not the job.
3. **Per-item randomness.** Where an item needs random numbers, its seed is
   :func:`item_seed` (a hash of the item's content hash and the user's seed), never its position
   in a batch or shard: the same item gets the same noise under any split.
4. **Provenance and resume.** Every output carries a :class:`Provenance` (input content hash,
   the options that shape the output, the model's weight fingerprint) in its own file:
   safetensors/pt metadata for seeds, a PNG text chunk for images. Before any work,
   :func:`plan` compares each existing output with what this run would write: equal -> skip;
   different -> refuse (:class:`~latentgeo.errors.OutputExistsError`, exit 2, naming the file and
   what differs); ``force`` -> redo.
5. **Atomic, pid-tagged writes.** An output is written to ``.NAME.HOST.PID.RAND.tmp`` beside it
   and published by a link that never replaces (or, with ``force``, a rename). A process killed
   mid-write leaves only such a temp file; :func:`clean_stale_temps` removes those whose writer
   (same host) no longer runs, and never a live process's.
6. **Manifests.** Each shard appends JSON lines to ``manifest-IIIII-of-NNNNN.jsonl`` in the
   output directory: a ``start`` record per run, one record per item (input, output, status
   ``done`` / ``skipped`` / ``failed``, metrics, seconds), an ``end`` record when the shard's
   work is finished. :func:`merge_manifests` reads them all: the last record per input wins, a
   shard whose last run has no ``end`` record (or whose file is missing) is incomplete.
7. **Failures.** An item that fails is recorded and the rest go on. Alone, the run exits 2 at
   the end naming the failures; under a launcher with several ranks it exits 0 (torchrun tears
   down every worker when one exits non-zero), and ``latentgeo manifest DIR`` reports them.

Nothing here imports a model or Rich; progress is a callback.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentgeo.errors import InputError, LatentgeoError, OutputExistsError
from latentgeo.launch import Shard

#: Metadata key (safetensors / pt) and PNG text-chunk keyword holding the provenance JSON.
PROVENANCE_KEY = "latentgeo_provenance"
MANIFEST_GLOB = "manifest-*-of-*.jsonl"
_MANIFEST_RE = re.compile(r"^manifest-(\d+)-of-(\d+)\.jsonl$")


# -- hashing and per-item seeds -------------------------------------------------------------------
def bytes_hash(data: bytes) -> str:
    """SHA-256 of ``data``, hex (64 digits)."""
    return hashlib.sha256(data).hexdigest()


def file_hash(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in ``block``-byte pieces (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(block):
            h.update(piece)
    return h.hexdigest()


def tensor_hash(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values (row-major bytes on the CPU): equal for
    equal tensors wherever they were stored (a file of one seed or a row of a batch file)."""
    x = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{x.dtype}:{tuple(x.shape)}:".encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def item_seed(item_hash: str, seed: int = 0) -> int:
    """A 63-bit random seed for one item: BLAKE2b(item content hash, user seed). Depends on the
    item only, not on its position in a batch, shard or run."""
    digest = hashlib.blake2b(f"{item_hash}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def item_generator(item_hash: str, seed: int = 0, device: str | torch.device = "cpu"
                   ) -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`item_seed`."""
    return torch.Generator(device=device).manual_seed(item_seed(item_hash, seed))


# -- items, order and shards ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Item:
    """One input: ``key`` names its output (unique in a job, the sort key); ``source`` is how
    messages and manifests name the input; ``ref`` is what the loader needs (a path, or a
    (path, row) pair for a row of a batch file)."""

    key: str
    source: str
    ref: Any = None


def sort_items(items: Iterable[Item]) -> list[Item]:
    """Items sorted by key; two items with one key are an InputError naming both sources."""
    out = sorted(items, key=lambda it: it.key)
    for a, b in itertools.pairwise(out):
        if a.key == b.key:
            raise InputError(f"{a.source} and {b.source} would both be written as {a.key}; "
                             "rename one")
    return out


def shard_items(items: Sequence[Item], shard: Shard) -> list[Item]:
    """This shard's contiguous block of the sorted items."""
    block = shard.block(len(items))
    return list(items[block.start:block.stop])


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of at most ``size`` consecutive items (the last may be shorter)."""
    if size < 1:
        raise InputError(f"batch size {size}: must be at least 1")
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- provenance -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provenance:
    """What made an output: its input's content hash, the options that shape it (a flat
    JSON-able dict: steps, guidance, condition, ...) and the model's weight fingerprint."""

    input: str
    options: Mapping[str, Any]
    model: str

    def to_json(self) -> str:
        return json.dumps({"input": self.input, "options": dict(self.options),
                           "model": self.model}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> Provenance | None:
        """Parse :meth:`to_json`'s output; anything else (absent, corrupt) is None."""
        if not text:
            return None
        try:
            d = json.loads(text)
            return cls(input=str(d["input"]), options=dict(d["options"]), model=str(d["model"]))
        except (ValueError, KeyError, TypeError):
            return None

    def normalised(self) -> Provenance:
        """Options as JSON would give them back (tuples -> lists, ...), for comparison."""
        return Provenance(self.input, json.loads(json.dumps(dict(self.options),
                                                            sort_keys=True)), self.model)

    def differences(self, other: Provenance) -> list[str]:
        """What differs from ``other`` (the output's recorded provenance), in words."""
        a, b = self.normalised(), other.normalised()
        out = []
        if a.input != b.input:
            out.append("input content")
        if a.model != b.model:
            out.append(f"model {b.model} -> {a.model}")
        for k in sorted(set(a.options) | set(b.options)):
            if a.options.get(k) != b.options.get(k):
                out.append(f"{k} {b.options.get(k)!r} -> {a.options.get(k)!r}")
        return out


def read_provenance(path: str | os.PathLike) -> Provenance | None:
    """The provenance stored in an output (.safetensors/.pt metadata or a PNG text chunk);
    None when the file has none or cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(PROVENANCE_KEY)
        elif suffix == ".pt":
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            text = meta.get(PROVENANCE_KEY) if isinstance(meta, dict) else None
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:  # text chunks before the pixels are read on open
                value = im.info.get(PROVENANCE_KEY)
            text = None if value is None else str(value)
        else:
            return None
    except Exception:  # unreadable or truncated: no usable provenance
        return None
    return Provenance.from_json(text)


@dataclass
class Plan:
    """:func:`plan`'s verdict for one shard: items still to do, and items whose outputs are
    already there with matching provenance (skipped)."""

    todo: list[Item] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)


def plan(items: Sequence[Item], target: Callable[[Item], str | Path],
         provenance: Callable[[Item], Provenance], force: bool = False,
         hint: str = "pass force=True to redo them") -> Plan:
    """Resume rule: an item whose output is absent is to do; present with equal provenance,
    skipped; present and different (or without provenance), refused unless ``force``.

    Refusal is one OutputExistsError naming the first such output and what differs, then
    ``hint`` (the CLI names its flag), raised before anything is written.
    ``provenance(item)`` is called only for existing outputs.
    """
    result = Plan()
    conflicts: list[str] = []
    for it in items:
        path = target(it)  # a Path or a str (a str builds no Path per item)
        if not os.path.exists(path):
            result.todo.append(it)
            continue
        if force:
            result.todo.append(it)
            continue
        if os.path.isdir(path):
            raise OutputExistsError(f"{path}: is a directory")
        old = read_provenance(path)
        if old is None:
            conflicts.append(f"{path}: exists without latentgeo provenance")
            continue
        diff = provenance(it).differences(old)
        if diff:
            conflicts.append(f"{path}: exists from a different run ({'; '.join(diff)})")
        else:
            result.skipped.append(it)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise OutputExistsError(f"{conflicts[0]}{more}; {hint}")
    return result


# -- atomic, pid-tagged writes --------------------------------------------------------------------
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _host() -> str:
    """This machine's name as used in temp names (dots would split the pattern: replaced)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname() or "host")


def temp_path(path: Path, pid: int | None = None) -> Path:
    """``.NAME.HOST.PID.RAND.tmp`` beside ``path`` (not created)."""
    return path.parent / _temp_name(path.name, os.getpid() if pid is None else pid)


def _temp_name(name: str, pid: int) -> str:
    """The file name part of :func:`temp_path`."""
    return f".{name}.{_host()}.{pid}.{secrets.token_hex(4)}.tmp"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0; EPERM means it does)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove this job layer's temp files in ``directory`` whose writer was on this host and
    has exited; returns them. Temp files of live processes and other hosts are left alone."""
    d = Path(directory)
    if not d.is_dir():
        return []
    host, removed = _host(), []
    with os.scandir(d) as entries:  # names as strings: no Path (interned name) per file
        stale = [e.name for e in entries if (m := _TEMP_RE.match(e.name))
                 and m.group("host") == host and not pid_alive(int(m.group("pid")))]
    for name in stale:
        p = d / name
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None],
                 force: bool = False) -> Any:
    """``write(tmp)`` into a pid-tagged temp file beside ``path``, then publish it: without
    ``force`` by a hard link that fails if ``path`` exists (never replaces a file that appeared
    meanwhile), with ``force`` by an atomic rename (:func:`latentgeo.io.publish`). Any
    exception, KeyboardInterrupt included, removes the temp file; a SIGKILL leaves it for
    :func:`clean_stale_temps`.

    Returns ``path`` as a ``Path``; a ``str`` path stays a ``str`` (and ``write`` then gets the
    temp file's name as a ``str``): a job writes one file per item, and on Python 3.11 every
    ``Path`` built from a new name interns it, churning the interpreter's table of interned
    strings until it is rebuilt (a few MiB more peak memory in a long job)."""
    as_str = isinstance(path, str)
    name = path if as_str else os.fspath(path)
    parent = os.path.dirname(name)
    os.makedirs(parent or ".", exist_ok=True)
    tmp = os.path.join(parent, _temp_name(os.path.basename(name), os.getpid()))
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp if as_str else Path(tmp))
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file with their own mode
        from latentgeo.io import publish

        publish(tmp, name, force=force)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return name if as_str else Path(path)


def save_seed(path: str | os.PathLike, x: torch.Tensor, metadata: Mapping[str, str],
              provenance: Provenance, force: bool = False) -> Path:
    """One seed (any shape) as .safetensors (key ``latent``, string metadata) or .pt
    (``{"latent", "metadata"}``), with the provenance JSON under :data:`PROVENANCE_KEY`."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta[PROVENANCE_KEY] = provenance.to_json()
    x = x.detach().to("cpu").contiguous().clone()
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            save_file({"latent": x}, str(tmp), metadata=meta)
    elif path.suffix.lower() == ".pt":
        def write(tmp: Path) -> None:
            torch.save({"latent": x, "metadata": meta}, str(tmp))
    else:
        raise InputError(f"{path}: a seed file ends in .safetensors or .pt")
    return write_atomic(path, write, force=force)


def save_png(path: str | os.PathLike, img: torch.Tensor, provenance: Provenance,
             force: bool = False) -> Path:
    """One image (C, H, W) in [0, 1] as an 8-bit PNG with the provenance JSON in an iTXt
    chunk :data:`PROVENANCE_KEY` (before the image data, so reading it decodes no pixels)."""
    from PIL.PngImagePlugin import PngInfo

    from latentgeo.images import to_pil

    pil = to_pil(img)
    info = PngInfo()
    info.add_itxt(PROVENANCE_KEY, provenance.to_json())
    return write_atomic(path, lambda tmp: pil.save(tmp, format="PNG", pnginfo=info),
                        force=force)


# -- manifests ------------------------------------------------------------------------------------
def manifest_path(directory: str | os.PathLike, shard: Shard) -> Path:
    return Path(directory) / f"manifest-{shard.tag}.jsonl"


class Manifest:
    """One shard's JSON-lines log, appended to (never rewritten) and flushed line by line, so a
    crash loses at most the line being written. See the module docstring for the records."""

    def __init__(self, directory: str | os.PathLike, shard: Shard, lazy: bool = False) -> None:
        """``lazy``: hold records in memory until the first written or skipped item, so a run
        in which every input fails can leave nothing behind (:meth:`discard`)."""
        self.path = manifest_path(directory, shard)
        self.shard = shard
        self._file: Any = None
        self._held: list[Mapping[str, Any]] | None = [] if lazy else None

    def discard(self) -> bool:
        """Drop held records (lazy mode, nothing written yet); True if there were any."""
        if self._held is None:
            return False
        self._held = None
        return True

    def previous(self) -> dict[str, dict[str, Any]]:
        """The last ``done`` record per input from earlier runs of this shard."""
        out: dict[str, dict[str, Any]] = {}
        for rec in read_manifest(self.path):
            if rec.get("event") == "item" and rec.get("status") == "done":
                out[rec["input"]] = rec
        return out

    def _append(self, record: Mapping[str, Any]) -> None:
        if self._held is not None:
            self._held.append(record)
            if record.get("status") in ("done", "skipped") or record.get("event") == "end":
                held, self._held = self._held, None
                for r in held:
                    self._append(r)
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            if self._file.tell() > 0 and not _ends_with_newline(self.path):
                self._file.write("\n")  # end a line a kill cut short, so ours parse
        self._file.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
        self._file.flush()

    def start(self, command: str, items: int, options: Mapping[str, Any],
              launcher: str | None = None) -> None:
        self._append({"event": "start", "command": command, "shard": self.shard.index,
                      "shards": self.shard.count, "items": items, "options": dict(options),
                      "launcher": launcher, "host": socket.gethostname(), "pid": os.getpid(),
                      "time": time.time()})

    def item(self, input: str, output: str, status: str, seconds: float,
             metrics: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        rec: dict[str, Any] = {"event": "item", "input": input, "output": output,
                               "status": status, "seconds": round(float(seconds), 6),
                               "metrics": dict(metrics or {})}
        if error is not None:
            rec["error"] = error
        self._append(rec)

    def end(self, done: int, skipped: int, failed: int, seconds: float) -> None:
        self._append({"event": "end", "done": done, "skipped": skipped, "failed": failed,
                      "seconds": round(float(seconds), 6), "time": time.time()})

    def stop(self, reason: str) -> None:
        """An interrupted run (the shard stays incomplete)."""
        self._append({"event": "stop", "reason": reason, "time": time.time()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A manifest's records; lines that do not parse (the one a kill cut short) are dropped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


@dataclass
class ShardState:
    """One shard file's last run: what it was asked to do, what happened, whether it ended."""

    index: int
    count: int
    path: Path | None
    items: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    complete: bool = False
    command: str | None = None


@dataclass
class Summary:
    """:func:`merge_manifests`'s result: shards of the newest split, every input's final
    record, and what is wrong (failed inputs, incomplete or missing shards)."""

    shards: list[ShardState]
    records: dict[str, dict[str, Any]]
    failed: list[dict[str, Any]]
    incomplete: list[ShardState]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.incomplete


def merge_manifests(directory: str | os.PathLike) -> Summary:
    """Merge every ``manifest-I-of-N.jsonl`` in ``directory``.

    Shards are judged in the newest split (the N of the most recent ``start`` record): a shard
    whose file is missing, or whose last run has no ``end`` record, is incomplete. Records of
    inputs are taken from every file, the latest per input winning; a ``skipped`` record
    inherits the metrics of the input's latest ``done`` record. InputError if there is none.
    """
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d}: not a directory")
    files = sorted(p for p in d.iterdir() if _MANIFEST_RE.match(p.name))
    if not files:
        raise InputError(f"{d}: no manifest-*-of-*.jsonl files (written by sharded or "
                         "streamed invert/render runs)")
    runs: list[tuple[float, int, int, Path, list[dict[str, Any]]]] = []
    for p in files:
        m = _MANIFEST_RE.match(p.name)
        assert m is not None
        recs = read_manifest(p)
        starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
        last = recs[starts[-1]:] if starts else []
        t = float(last[0].get("time", 0.0)) if last else 0.0
        runs.append((t, int(m.group(1)), int(m.group(2)), p, recs))
    newest_count = max(runs, key=lambda r: r[0])[2]
    records: dict[str, tuple[float, dict[str, Any]]] = {}
    done_metrics: dict[str, tuple[float, dict[str, Any]]] = {}
    states: dict[int, ShardState] = {}
    for t, index, count, p, recs in runs:
        for order, rec in enumerate(recs):
            if rec.get("event") != "item":
                continue
            key = (t, order)
            name = str(rec.get("input"))
            if rec.get("status") == "done" and (name not in done_metrics
                                                 or done_metrics[name][0] <= key):
                done_metrics[name] = (key, rec)
            if name not in records or records[name][0] <= key:
                records[name] = (key, rec)
        if count != newest_count:
            continue
        st = ShardState(index=index, count=count, path=p)
        starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
        if starts:
            last = recs[starts[-1]:]
            st.items = int(last[0].get("items", 0))
            st.command = last[0].get("command")
            for r in last[1:]:
                if r.get("event") == "item":
                    st.done += r.get("status") == "done"
                    st.skipped += r.get("status") == "skipped"
                    st.failed += r.get("status") == "failed"
                    st.seconds += float(r.get("seconds", 0.0))
            st.complete = any(r.get("event") == "end" for r in last[1:])
        states[index] = st
    shards = [states.get(i, ShardState(index=i, count=newest_count, path=None))
              for i in range(newest_count)]
    final: dict[str, dict[str, Any]] = {}
    for name, (_, rec) in sorted(records.items()):
        rec = dict(rec)
        if rec.get("status") == "skipped" and name in done_metrics and not rec.get("metrics"):
            rec["metrics"] = done_metrics[name][1].get("metrics", {})
        final[name] = rec
    failed = [r for r in final.values() if r.get("status") == "failed"]
    return Summary(shards=shards, records=final, failed=failed,
                   incomplete=[s for s in shards if not s.complete])


# -- signals --------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks (temp-file removal) run as
    they do on Ctrl-C. Carries the signal number; the exit status is 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (outside the main thread: no-op)."""
    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one item produced: its output path and metrics (a :func:`run` ``process`` result);
    or, with ``error`` set, why this item failed while the rest of its chunk succeeded."""

    output: str | Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: why this one item failed (nothing was written for it), e.g. a non-finite result
    error: str | None = None


@dataclass
class Report:
    """:func:`run`'s result for this shard."""

    done: list[tuple[Item, Outcome]] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)
    failed: list[tuple[Item, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: items written (``done`` holds them only with ``run(keep_outcomes=True)``)
    n_done: int = 0


Loader = Callable[[Item], Any]
Processor = Callable[[list[Item], list[Any]], list[Outcome]]


def run(items: Sequence[Item], load: Loader, process: Processor, *, batch_size: int,
        manifest: Manifest | None = None, skipped: Sequence[Item] = (),
        target: Callable[[Item], Path] | None = None,
        progress: Callable[[int], None] | None = None, keep_outcomes: bool = True) -> Report:
    """Stream ``items`` through ``load`` (one item -> its input, e.g. an image tensor; a
    LatentgeoError marks the item failed) and ``process`` (a list of <= ``batch_size`` items and
    their inputs -> one Outcome each, outputs already written, or an Outcome with ``error`` set
    for an item that failed alone and wrote nothing). A LatentgeoError from ``process`` fails
    the whole chunk; other exceptions propagate (bugs, interrupts).

    ``skipped`` items (from :func:`plan`) are recorded in the manifest with the metrics of their
    last ``done`` record. ``progress(n)`` is called with the number of items just finished
    (skipped ones first). A record's ``seconds`` is its chunk's wall time shared equally.
    ``keep_outcomes`` False: ``report.done`` stays empty (only ``n_done`` counts), so memory
    does not grow with the job.
    """
    report = Report(skipped=list(skipped))
    t_start = time.perf_counter()
    if manifest is not None and skipped:
        prev = manifest.previous()
        for it in skipped:
            old = prev.get(it.source, {})
            out = str(target(it)) if target is not None else old.get("output", "")
            manifest.item(it.source, out, "skipped", 0.0, old.get("metrics"))
    if progress is not None and skipped:
        progress(len(skipped))
    for chunk in chunks(items, batch_size):
        t0 = time.perf_counter()
        good: list[Item] = []
        inputs: list[Any] = []
        for it in chunk:
            try:
                inputs.append(load(it))
                good.append(it)
            except LatentgeoError as e:
                report.failed.append((it, _one_line(e)))
                if manifest is not None:
                    manifest.item(it.source, "", "failed", 0.0, error=_one_line(e))
        outcomes: list[Outcome] = []
        error: str | None = None
        if good:
            try:
                outcomes = process(good, inputs)
            except LatentgeoError as e:
                error = _one_line(e)
        share = (time.perf_counter() - t0) / max(1, len(good))
        for i, it in enumerate(good):
            if error is not None:
                report.failed.append((it, error))
                if manifest is not None:
                    manifest.item(it.source, "", "failed", share, error=error)
                continue
            oc = outcomes[i]
            if oc.error is not None:
                report.failed.append((it, oc.error))
                if manifest is not None:
                    manifest.item(it.source, "", "failed", share, error=oc.error)
                continue
            report.n_done += 1
            if keep_outcomes:
                report.done.append((it, oc))
            if manifest is not None:
                manifest.item(it.source, str(oc.output), "done", share, oc.metrics)
        del inputs, outcomes
        if progress is not None:
            progress(len(chunk))
    report.seconds = time.perf_counter() - t_start
    return report


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def failure_message(failed: Sequence[tuple[Item, str]], written: int, limit: int = 3) -> str:
    """``2 input(s) failed (a.png: reason; b.png: reason), 5 output(s) written``."""
    shown = "; ".join(why if why.startswith(it.source) else f"{it.source}: {why}"
                      for it, why in failed[:limit])
    more = f"; and {len(failed) - limit} more" if len(failed) > limit else ""
    return f"{len(failed)} input(s) failed ({shown}{more}), {written} output(s) written"


def exit_on_failures(failed: Sequence[tuple[Item, str]], written: int, world_size: int,
                     warn: Callable[[str], None]) -> None:
    """The failure rule: alone, an InputError (exit 2) naming the failures; one rank among
    several, a warning only (exit 0), the failures being in the manifest."""
    if not failed:
        return
    message = failure_message(failed, written)
    if world_size > 1:
        warn(f"warning: {message} (recorded in the manifest; exit 0 under the launcher)")
        return
    raise InputError(message)


# -- inputs: seeds read lazily --------------------------------------------------------------------
def _seed_shape(path: str) -> tuple[int, ...]:
    """A seed file's tensor shape without reading its values. ``path`` is a string: a job
    calls this once per input, and a ``Path`` per call would intern every file name."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            from latentgeo.io import _SAFETENSORS_DTYPES
            from latentgeo.limits import MAX_ELEMENTS

            with safe_open(path, framework="pt") as f:
                ok = "latent" in f.keys()
                if ok:
                    sl = f.get_slice("latent")
                    shape = tuple(sl.get_shape())
                    ok = sl.get_dtype() in _SAFETENSORS_DTYPES and 0 < len(shape) and \
                        0 < math.prod(shape) <= MAX_ELEMENTS
            if not ok:  # the reason, in io's words
                _canonical_refusal(Path(path))
                raise InputError(f"{path}: not a seed file latentgeo reads")
            return shape
        if suffix == ".pt":
            from latentgeo.io import validate_latent

            # whole-file checks (dense, no shared memory, size, dtype, finite) on the mapped
            # tensor; its pages are released when it is dropped
            return tuple(validate_latent(_pt_tensor(Path(path)), path).shape)
    except LatentgeoError:
        raise
    except Exception as e:
        _canonical_refusal(Path(path))
        raise InputError(f"{path}: not a readable seed file ({_one_line(e)})") from None
    raise InputError(f"{path}: unknown seed file type '{Path(path).suffix}' (expected .pt or "
                     ".safetensors)")


def _canonical_refusal(path: Path) -> None:
    """Raise the one-line refusal :func:`latentgeo.io.load_latent` gives for a file the lazy
    readers could not read (a pickle that imports code, a corrupt header, ...)."""
    from latentgeo.io import load_latent

    load_latent(path)


def _pt_tensor(path: Path) -> torch.Tensor:
    """The latent of a .pt file, memory-mapped where the file allows (the zip format), with
    :mod:`latentgeo.io`'s refusals (a pickle that imports anything is named, never run; sparse,
    expanded, oversized or non-float tensors refused) and no value read yet."""
    import warnings

    from latentgeo.io import _pt_refusal, _unpack_pt, check_latent_layout

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's pickle-protocol notes are not for users
        try:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be mapped
                if "Weights only load failed" in str(e):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except LatentgeoError:
            raise
        except Exception as e:
            raise InputError(_pt_refusal(path, e)) from None
    x, _ = _unpack_pt(obj, path)
    return check_latent_layout(x, str(path))


def seed_items(paths: Sequence[str | os.PathLike], latent_shape: Sequence[int]
               ) -> tuple[list[Item], list[str]]:
    """One Item per seed, values not read, and one problem line per file that cannot be used.

    A file of shape ``latent_shape`` is one seed keyed by its stem; a batch (B, *latent_shape)
    gives B seeds keyed ``STEM_000`` ... (source ``FILE[i]``, ref ``i``). Keys are made unique
    by :func:`latentgeo.io.unique_names` (``grid`` reserved). A file of another shape, or one
    that is not a seed file, is a problem naming it (and both shapes).
    """
    from latentgeo.io import unique_names

    shape = tuple(int(s) for s in latent_shape)
    keys: list[str] = []
    refs: list[tuple[str, Any]] = []
    problems: list[str] = []
    for p in paths:
        name = os.fspath(p)  # a string stays the same object (the caller's list holds it)
        try:
            s = _seed_shape(name)
        except LatentgeoError as e:
            problems.append(_one_line(e))
            continue
        stem = os.path.splitext(os.path.basename(name))[0]  # Path.stem, without a Path
        if s == shape:
            keys.append(stem)
            refs.append((name, None))
        elif len(s) == len(shape) + 1 and s[1:] == shape:
            keys.extend(f"{stem}_{i:03d}" for i in range(s[0]))
            refs.extend((f"{name}[{i}]", i) for i in range(s[0]))
        else:
            problems.append(f"{p}: seed shape {s} does not fit the model, whose seeds have "
                            f"shape {shape} (or a batch (N, {', '.join(map(str, shape))}))")
    if "grid" in keys or len(set(keys)) != len(keys):  # rare: skip the renaming's sets
        keys = unique_names(keys, reserved=("grid",))
    return [Item(k, src, ref) for k, (src, ref) in zip(keys, refs)], problems


_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "F64": torch.float64}


def _safetensors_row(path: str | Path, row: int) -> torch.Tensor:
    """Row ``row`` of the ``latent`` tensor of a safetensors file, read with one seek and one
    read (the format: 8-byte little-endian header length, JSON header with dtype, shape and
    data offsets, then the row-major data). No memory map: a mapped batch file's pages would
    count towards the process's resident memory, growing with the file."""
    import struct
    import sys

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header["latent"]
        dtype = _ST_DTYPES[meta["dtype"]]
        shape = [int(d) for d in meta["shape"]]
        if not 0 <= row < shape[0]:
            raise InputError(f"{path}: row {row} is outside its {shape[0]} seed(s)")
        start, _ = (int(o) for o in meta["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = math.prod(shape[1:])
        f.seek(8 + n + start + row * count * itemsize)
        data = bytearray(f.read(count * itemsize))
    if len(data) != count * itemsize:
        raise InputError(f"{path}: file is truncated (row {row})")
    x = torch.frombuffer(data, dtype=dtype).reshape(shape[1:])
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        x = x.view(torch.uint8).reshape(*shape[1:], itemsize).flip(-1).view(dtype)
    return x


def load_seed(item: Item) -> torch.Tensor:
    """The seed of a :func:`seed_items` item as float32, read alone (one row of a batch file
    by seek and read, or a memory-mapped .pt row; the file is closed again, so nothing of it
    stays resident). NaN or infinite entries are an InputError naming the source."""
    # the path stays a string (a Path per item would intern every file name on Python 3.11)
    if item.ref is None:
        path, row = item.source, None
    else:  # a batch row: source is FILE[ROW], ref the row
        path, row = item.source[:item.source.rindex("[")], int(item.ref)
    try:
        if os.path.splitext(path)[1].lower() == ".safetensors":
            from safetensors import safe_open

            if row is None:
                with safe_open(path, framework="pt") as f:
                    x = f.get_tensor("latent")
            else:
                x = _safetensors_row(path, row)
        else:
            t = _pt_tensor(Path(path))
            x = (t if row is None else t[row]).clone()
            del t
    except LatentgeoError:
        raise
    except Exception as e:
        _canonical_refusal(Path(path))
        raise InputError(f"{item.source}: not a readable seed ({_one_line(e)})") from None
    from latentgeo.io import validate_latent

    return validate_latent(x, item.source).to(torch.float32).contiguous()
