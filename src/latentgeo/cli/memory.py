"""Giving freed heap memory back to the operating system between the chunks of a job.

A streaming job (``render``, ``invert``, ``optimize`` into a folder) frees everything a chunk
allocated before the next chunk starts, but glibc's malloc keeps freed memory in the process
to reuse it: how much it keeps depends on how the chunk's tensors happened to be laid out on
the heap (its dynamic mmap threshold and fragmentation), so the resident memory, and its peak,
wanders by 10-20 MiB from run to run and drifts up with the length of the job although nothing
is held (bundled model, ``render --steps 5``: the heap's free bytes settled at 6 MiB in one run
and 20 MiB in another of the same command). :func:`release_free_memory` calls glibc's
``malloc_trim(0)`` (free pages at the top of the heap and inside it go back to the kernel) once
per chunk, so the peak is what the chunk uses. Cost: one pass over the heap's free lists and
the page faults of touching the chunk's memory again, about 1% of a chunk of 16 seeds (measured
by ``benchmarks/bench_scale.py``). Elsewhere than glibc (macOS, musl, Windows) it does nothing.
``LATENTGEO_MALLOC_TRIM=0`` turns it off.

It lives at the CLI edge: the library never touches the allocator.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> None:
    """``malloc_trim(0)`` where glibc provides it (and ``LATENTGEO_MALLOC_TRIM`` is not 0)."""
    if os.environ.get("LATENTGEO_MALLOC_TRIM", "1") == "0":
        return
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
