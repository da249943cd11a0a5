"""Who am I in a multi-process job: rank, world size and device from the launcher's environment,
and the shard of the work that is mine.

Launchers recognised (each sets the variables named; nothing here talks to other processes):

* ``torchrun`` / ``python -m torch.distributed.run``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
  (and ``TORCHELASTIC_RUN_ID``).
* ``accelerate launch``: the same three when it starts several processes (it runs torchrun's
  launcher underneath), plus ``ACCELERATE_*`` variables; under ``mpirun`` (accelerate's
  multi-CPU mode) the MPI ranks ``OMPI_COMM_WORLD_*`` / ``PMI_*`` / ``MV2_COMM_WORLD_*``.
* Job arrays (SLURM, PBS, ...): no process group at all; the user passes ``--shard I/N``
  (e.g. ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``).

Both compose: ``--shard I/N`` under a launcher of world size W makes the process of rank r
shard ``I * W + r`` of ``N * W``, so a job array of torchrun jobs splits the inputs once,
without overlap. Shards are contiguous blocks of the sorted inputs (accelerate's
``split_between_processes`` rule: the first ``n mod S`` shards get one item more).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from latentgeo.errors import InputError

#: (rank, world size, local rank) variable names per launcher family, first match wins.
_RANK_VARIABLES: tuple[tuple[str, str, str, str], ...] = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("mpi", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched group (``launcher`` None: started alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str | None = None

    @property
    def launched(self) -> bool:
        """True under torchrun / accelerate / MPI, even with a world of one."""
        return self.launcher is not None


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count) of the sorted inputs."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"shard {self.index}/{self.count}: need 0 <= I < N")

    @property
    def tag(self) -> str:
        """``00001-of-00004``: the shard in file names (sorts in index order)."""
        return f"{self.index:05d}-of-{self.count:05d}"

    def block(self, n: int) -> range:
        """The positions of this shard's items among ``n`` sorted items: a contiguous block,
        sizes differing by at most one, larger ones first (accelerate's rule)."""
        base, extra = divmod(n, self.count)
        start = self.index * base + min(self.index, extra)
        return range(start, start + base + (1 if self.index < extra else 0))


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Rank, world size and local rank from the launcher's variables (module docstring).

    No variables: a lone process, ``Launch()``. ``LOCAL_RANK`` missing defaults to the rank.
    Inconsistent values (rank outside the world) are an InputError naming the variables.
    """
    env = os.environ if env is None else env
    for family, rank_name, size_name, local_name in _RANK_VARIABLES:
        rank, size = _int_var(env, rank_name), _int_var(env, size_name)
        if rank is None and size is None:
            continue
        if rank is None or size is None:
            raise InputError(f"{rank_name} and {size_name} must be set together "
                             f"(got only {rank_name if rank is not None else size_name})")
        if size < 1 or not 0 <= rank < size:
            raise InputError(f"{rank_name}={rank} does not fit {size_name}={size}")
        local = _int_var(env, local_name)
        launcher = family
        if family == "torchrun" and any(k.startswith("ACCELERATE_") for k in env):
            launcher = "accelerate"
        return Launch(rank=rank, world_size=size, local_rank=rank if local is None else local,
                      launcher=launcher)
    if "ACCELERATE_MIXED_PRECISION" in env:
        # accelerate launch's one-process ("simple") launcher sets no rank variables
        return Launch(launcher="accelerate")
    return Launch()


_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str, name: str = "shard") -> Shard:
    """``"I/N"`` -> Shard(I, N), 0 <= I < N; anything else is an InputError starting with
    ``name`` (the CLI passes its flag)."""
    m = _SHARD_RE.match(text or "")
    if not m:
        raise InputError(f"{name} {text!r}: expected I/N with integers, e.g. 0/4")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise InputError(f"{name} {text}: need 0 <= I < N (shards are numbered from 0)")
    return Shard(index, count)


def resolve_shard(shard: str | Shard | None, launch: Launch, name: str = "shard") -> Shard:
    """This process's shard: ``I/N`` (or none: 0/1) subdivided by the launcher's rank, index
    ``I * W + rank`` of ``N * W``."""
    base = parse_shard(shard, name) if isinstance(shard, str) else (shard or Shard())
    w = launch.world_size
    return Shard(base.index * w + launch.rank, base.count * w)


def rank_device(requested: str, launch: Launch, cuda_count: int | None = None) -> str:
    """The device this rank uses for ``--device requested``.

    Under a launcher, ``cuda`` (no index) becomes ``cuda:LOCAL_RANK`` (modulo the visible GPUs)
    and ``auto`` becomes that where GPUs exist, else ``cpu``; alone, ``auto`` is ``cuda`` or
    ``cpu``. An explicit ``cuda:N``, ``cpu`` or ``mps`` is kept as given.
    """
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    req = requested.strip().lower()
    if req == "auto":
        if cuda_count == 0:
            return "cpu"
        req = "cuda"
    if req == "cuda" and cuda_count > 0:
        return f"cuda:{launch.local_rank % cuda_count}" if launch.launched else "cuda"
    return requested
