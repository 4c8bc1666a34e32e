"""glibc malloc set to keep freed memory for reuse instead of handing it back to the kernel.

XLA:CPU allocates every execution's buffers anew and frees them at its end. Under glibc's defaults a large
buffer is mmap'd (always so from a worker thread's arena, which holds at most 64 MB), freed with munmap, and
its pages are faulted in again, zero-filled by the kernel, on the next step: about 130,000 page faults a
classification train step and 170,000 an MLM step of `jaxopt-llm bench`'s model. With one arena, no mmap and no
trimming, later steps reuse pages already mapped. The process keeps its peak heap, as a caching allocator does.

`keep_freed_memory()` must run before the first JAX computation: a thread that has already allocated keeps
the arena it was given, and it warns when glibc holds more than one. The command line calls it first thing;
JAXOPT_LLM_MALLOC=0 leaves glibc's defaults. Where another allocator answers malloc (LD_PRELOAD) it applies
nothing and says so.
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
    (M_TRIM_THRESHOLD, -1),  # never trim (mallopt(3)): freed memory at the heap's top stays mapped, however large
    (M_TOP_PAD, 64 << 20),  # the heap grows 64 MiB at a time, not page by page
)

_applied = False


def _glibc():
    """This process's glibc, or None (another libc, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts nothing
    except (OSError, AttributeError):
        return None
    return libc


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def malloc_is_glibc(libc) -> bool:
    """False when another allocator (LD_PRELOAD=libjemalloc.so, say) answers this process's malloc calls."""
    return _address(ctypes.CDLL(None).malloc) == _address(libc.malloc)


def arenas(libc=None) -> int | None:
    """How many malloc arenas glibc holds (the <heap> entries of malloc_info); None off glibc."""
    libc = libc or _glibc()
    if libc is None:
        return None
    text, size = ctypes.c_char_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(text), ctypes.byref(size)))
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    xml = ctypes.string_at(text, size.value)
    libc.free(text)
    return xml.count(b"<heap nr=")


def keep_freed_memory() -> bool:
    """Apply SETTINGS to glibc malloc; True when applied (now or before). False off glibc Linux, when another
    allocator answers malloc, or when JAXOPT_LLM_MALLOC=0."""
    global _applied
    if _applied:
        return True
    if os.environ.get("JAXOPT_LLM_MALLOC", "1") == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    if not malloc_is_glibc(libc):
        warnings.warn("jaxopt_llm.heap: malloc in this process is not glibc's (LD_PRELOAD="
                      f"{os.environ.get('LD_PRELOAD', '')!r}); glibc's settings would not reach it, so none are "
                      "applied", stacklevel=2)
        return False
    held = arenas(libc)
    if held > 1:
        warnings.warn(f"jaxopt_llm.heap.keep_freed_memory(): glibc holds {held} malloc arenas already; threads that "
                      "allocated before this call (JAX's, once it has run) keep theirs, and their large buffers are "
                      "still mmap'd and unmapped on every execution. Call it before the first JAX computation",
                      stacklevel=2)
    _applied = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied


def applied() -> bool:
    return _applied
