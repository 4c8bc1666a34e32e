"""glibc malloc set to keep freed memory for reuse instead of handing it back to the kernel.

XLA:CPU allocates every execution's buffers anew and frees them at its end. Under glibc's defaults a large
buffer is mmap'd (always so from a worker thread's arena, which holds at most 64 MB), freed with munmap, and
its pages are faulted in again, zero-filled by the kernel, on the next step: about 130,000 page faults a
classification train step and 170,000 an MLM step of `jaxopt-llm bench`'s model. With one arena, no mmap and no
trimming, later steps reuse pages already mapped. The process keeps its peak heap, as a caching allocator does.

`keep_freed_memory()` must run before the first JAX computation: a thread that has already allocated keeps
the arena it was given. The command line calls it first thing; JAXOPT_LLM_MALLOC=0 leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

# mallopt parameters, glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = (
    (M_ARENA_MAX, 1),  # XLA allocates from its worker threads: every thread uses the main (brk) heap
    (M_MMAP_MAX, 0),  # no allocation is mmap'd, so none is unmapped when freed
    (M_TRIM_THRESHOLD, 2**31 - 1),  # freed memory at the heap's top stays mapped (mallopt takes an int)
    (M_TOP_PAD, 64 << 20),  # the heap grows 64 MiB at a time, not page by page
)

_applied = False


def _jax_started() -> bool:
    if "jax" not in sys.modules:  # not imported: nothing started, and importing it here would be a side effect
        return False
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Apply SETTINGS to glibc malloc; True when applied (now or before). False off glibc Linux or when
    JAXOPT_LLM_MALLOC=0."""
    global _applied
    if _applied:
        return True
    if os.environ.get("JAXOPT_LLM_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts nothing
    except (OSError, AttributeError):
        return False
    if _jax_started():
        warnings.warn("jaxopt_llm.heap.keep_freed_memory() called after JAX started: XLA's threads keep the "
                      "arenas they already have; call it before the first JAX computation", stacklevel=2)
    _applied = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied


def applied() -> bool:
    return _applied
