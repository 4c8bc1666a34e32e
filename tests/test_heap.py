"""jaxopt_llm.heap: under glibc's defaults XLA's threads get arenas of their own and every execution of a
program with a large temporary mmaps it and unmaps it again; with freed memory kept, every thread allocates
from the one main heap, which keeps the freed buffers for the next execution. Each case runs in a fresh
process, the reference being the same program under glibc's defaults; glibc itself reports its arenas
(malloc_info) and heap (mallinfo2). Page faults are the kernel's side of it and depend on the host (on the
project's CI machine the kept heap was faulted in on every execution, here never), so they are reported, not
asserted."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

from jaxopt_llm import heap

HUGE_BYTES = 2**31 + 2**28  # 2.25 GiB: more than mallopt's largest positive trim threshold
PROGRAM = f"HUGE_BYTES = {HUGE_BYTES}\n" + textwrap.dedent("""
    import ctypes, json, os, resource, sys, warnings
    from concurrent.futures import ThreadPoolExecutor
    from jaxopt_llm import heap
    mode = sys.argv[1]

    class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    def keep():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            applied = heap.keep_freed_memory()
        return applied, [str(w.message) for w in caught]

    applied, said = keep() if mode in ("keep", "preloaded", "huge") else (False, [])
    if mode == "preloaded":
        print(json.dumps({"applied": applied, "warnings": said}))
        sys.exit()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if mode == "huge":  # a freed buffer of more than 2 GiB at the heap's top
        import numpy as np
        buffer = np.ones(HUGE_BYTES // 4, np.float32)
        del buffer
        print(json.dumps({"applied": applied, "heap_mib": libc.mallinfo2().arena / 2**20}))
        sys.exit()
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):  # an 81 MiB product held while its transpose is added: more than a thread's arena holds
        y = x @ x.T
        return (y + y.T).sum()

    x = jnp.ones((4608, 8), jnp.float32) / 8
    worker = ThreadPoolExecutor(1)  # XLA allocates on the threads that run the program: not the main one
    run = lambda: worker.submit(lambda: f(x).block_until_ready()).result()
    run()
    if mode == "late":
        applied, said = keep()
    run()
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "warnings": said, "faults": faults, "arenas": heap.arenas(),
                      "heap_mib": libc.mallinfo2().arena / 2**20, "ld_preload": os.environ.get("LD_PRELOAD")}))
""")
PRODUCT_MIB = 4608 * 4608 * 4 / 2**20

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc exists on Linux only; elsewhere keep_freed_memory() changes "
                                       "nothing (test_other_platforms_keep_their_allocator)")
glibc_malloc = pytest.mark.skipif(sys.platform.startswith("linux") and not heap.malloc_is_glibc(heap._glibc()),
                                  reason=f"malloc is not glibc's here (LD_PRELOAD={os.environ.get('LD_PRELOAD')!r}): "
                                         "keep_freed_memory() applies nothing "
                                         "(test_another_allocator_gets_no_settings)")


def _run(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_only
@glibc_malloc
def test_kept_memory_puts_every_thread_on_one_heap_that_keeps_the_freed_buffers():
    default, kept = _run("default"), _run("keep")
    assert not default["applied"] and kept["applied"] and kept["warnings"] == [], (kept, default)
    assert default["arenas"] > 1 and kept["arenas"] == 1, (kept, default)  # XLA's threads: own arenas vs main
    assert kept["heap_mib"] > 2 * PRODUCT_MIB, (kept, default)  # the product and its sum, kept for reuse
    assert default["heap_mib"] < kept["heap_mib"] - PRODUCT_MIB, (kept, default)  # mmap'd, unmapped when freed
    if min(kept["faults"]) > min(default["faults"]) / 20:  # the host, not glibc: shown in the summary
        warnings.warn(f"the kept heap was faulted in again on this host: {kept['faults']} pages per execution "
                      f"(glibc's defaults: {default['faults']})")


@linux_only
@glibc_malloc
def test_a_freed_buffer_over_2_gib_is_kept_too():
    """A BERT-large train state (4 GB) freed at the heap's top was handed back and faulted in again every step
    while the trim threshold was mallopt's largest int (2 GiB): never trimming keeps it."""
    kept = _run("huge")
    assert kept["applied"] and kept["heap_mib"] > HUGE_BYTES / 2**20, kept


@linux_only
@glibc_malloc
def test_a_late_call_warns_of_the_arenas_jax_already_has():
    late = _run("late")
    assert late["applied"] and late["arenas"] > 1, late
    assert len(late["warnings"]) == 1 and "malloc arenas already" in late["warnings"][0], late


@linux_only
def test_another_allocator_gets_no_settings(tmp_path):
    assert shutil.which("gcc"), "this test builds a malloc shim with gcc: install it (apt-get install -y gcc)"
    (tmp_path / "shim.c").write_text(textwrap.dedent("""
        #include <stddef.h>
        void *__libc_malloc(size_t); void __libc_free(void *); void *__libc_calloc(size_t, size_t);
        void *__libc_realloc(void *, size_t);
        void *malloc(size_t n) { return __libc_malloc(n); }
        void free(void *p) { __libc_free(p); }
        void *calloc(size_t n, size_t size) { return __libc_calloc(n, size); }
        void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }
    """))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "shim.so", tmp_path / "shim.c"], check=True)
    preloaded = _run("preloaded", LD_PRELOAD=str(tmp_path / "shim.so"))
    assert preloaded["applied"] is False, preloaded
    assert len(preloaded["warnings"]) == 1 and "not glibc's" in preloaded["warnings"][0], preloaded


def test_switched_off_by_the_environment():
    assert _run("keep", JAXOPT_LLM_MALLOC="0")["applied"] is False


def test_other_platforms_keep_their_allocator(monkeypatch):
    monkeypatch.setattr(heap, "_applied", False)
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    monkeypatch.setattr(heap.ctypes, "CDLL", _refuse)  # never reached
    assert heap.keep_freed_memory() is False and not heap.applied() and heap.arenas() is None


def _refuse(name):
    raise AssertionError(f"libc {name!r} opened off Linux")
