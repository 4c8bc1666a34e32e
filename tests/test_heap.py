"""jaxopt_llm.heap: with glibc's defaults every execution of a program with a large temporary faults its pages
in again; with freed memory kept, an execution that reuses the heap faults none. Each case runs in a fresh
process, the reference being the same program under glibc's defaults. The least count of six executions is
compared: a host may reclaim idle memory on its own (this project's VMs page out 128 MB a second of memory
left cold), so some executions fault whatever the allocator does."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxopt_llm import heap

PROGRAM = textwrap.dedent("""
    import json, resource, sys, warnings
    from concurrent.futures import ThreadPoolExecutor
    from jaxopt_llm import heap
    keep = sys.argv[1] == "keep"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = heap.keep_freed_memory() if keep else False
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):  # an 81 MiB product held while its transpose is added: more than a thread's arena holds
        y = x @ x.T
        return (y + y.T).sum()

    x = jnp.ones((4608, 8), jnp.float32) / 8
    worker = ThreadPoolExecutor(1)  # XLA allocates on the thread that runs the program: here not the main one
    run = lambda: worker.submit(lambda: f(x).block_until_ready()).result()
    run()
    run()
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults, "warnings": [str(w.message) for w in caught]}))
""")


def _run(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="counts glibc's page faults, which exist on Linux only; elsewhere keep_freed_memory() "
                           "changes nothing (test_other_platforms_keep_their_allocator)")
def test_kept_memory_stops_the_page_faults_of_every_execution():
    default, kept = _run("default"), _run("keep")
    assert not default["applied"] and kept["applied"] and kept["warnings"] == []
    assert min(default["faults"]) > 20_000, default  # 81 MiB of 4 KiB pages faulted in by every execution
    assert min(kept["faults"]) < min(default["faults"]) / 20, (kept, default)


def test_switched_off_by_the_environment():
    assert _run("keep", JAXOPT_LLM_MALLOC="0")["applied"] is False


def test_other_platforms_keep_their_allocator(monkeypatch):
    monkeypatch.setattr(heap, "_applied", False)
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    monkeypatch.setattr(heap.ctypes, "CDLL", _NoMallopt.refuse)  # never reached
    assert heap.keep_freed_memory() is False and not heap.applied()


def test_late_call_warns_that_jax_started(monkeypatch):
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # this test process has started JAX
    monkeypatch.setattr(heap, "_applied", False)
    monkeypatch.setattr(heap.sys, "platform", "linux")  # the glibc path, on any platform
    monkeypatch.setattr(heap.ctypes, "CDLL", _NoMallopt)
    with pytest.warns(UserWarning, match="after JAX started"):
        assert heap.keep_freed_memory() is False


class _NoMallopt:
    """A libc whose mallopt accepts nothing: the test process's own allocator stays as it is."""

    def __init__(self, name):
        self.gnu_get_libc_version = lambda: b"test"

    @staticmethod
    def mallopt(param, value):
        return 0

    @staticmethod
    def refuse(name):
        raise AssertionError(f"libc {name!r} opened off Linux")
