"""Keep freed memory in the process: the heap setting the command-line tools run with.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the kernel on ``free``. A model evaluated in batches allocates and
frees tensors of that size many times a second (EfficientNet-Lite0 at batch 32: activations of
24-38 MiB), so every batch pays the kernel to map and zero the same pages again: on 2 cores,
one 128-crop evaluation spent 13-17 s of system time against 23-27 s of user time (7 million
minor page faults). :func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (every request from the
heap, where a freed block is reused) and ``M_TRIM_THRESHOLD = 1 GiB`` (the heap's free top is
given back only beyond that): the same evaluation took 2 s of system time and 0.8 million
faults, about 40 % less wall time, for about a quarter more peak memory (``docs/performance.md``).

Numbers are unchanged (only where memory comes from). ``abfp`` calls it at start-up; the
environment variable ``ABFP_KEEP_MEMORY=0`` leaves the allocator as it is. Elsewhere than on
glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

#: ``mallopt`` parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: The free top of the heap that is kept rather than given back to the kernel (bytes).
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Serve large allocations from the heap and keep freed memory (glibc only); returns whether
    the setting was applied. ``ABFP_KEEP_MEMORY=0`` in ``environ`` (default: ``os.environ``)
    turns it off."""
    env = os.environ if environ is None else environ
    if env.get("ABFP_KEEP_MEMORY", "1").strip() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to set
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt of another C library: leave it
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
