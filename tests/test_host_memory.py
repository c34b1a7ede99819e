"""Host malloc tunables: the environment they set, and that they remove the page faults of large allocations."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from mvlp_jax.kernels import host_memory

# On a worker thread, as XLA:CPU does a step's temporaries: mallocs, touches and frees 256 MB once to warm up,
# then ten times more, and reports the minor page faults of those ten. Plain libc malloc: numpy madvises its
# own large arrays already.
_ALLOCATE = """
import ctypes, json, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def step():
    block = libc.malloc(2 ** 28)
    ctypes.memset(block, 1, 2 ** 28)
    libc.free(block)
def steps():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(json.dumps(faults[0]))
"""


def test_environment_keeps_other_tunables_and_an_explicit_choice():
    assert host_memory.with_huge_page_malloc({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": host_memory.TUNABLE}
    merged = host_memory.with_huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert merged["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{host_memory.TUNABLE}"
    kept = host_memory.with_huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=4"})
    assert kept["GLIBC_TUNABLES"] == (
        "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=4:" + ":".join(host_memory.TUNABLES[2:])
    )


def test_makefile_gives_cpu_runs_the_same_tunables():
    makefile = (pathlib.Path(__file__).parents[1] / "Makefile").read_text()
    assert re.search(r"^CPU_MALLOC \?= (\S+)$", makefile, re.M).group(1) == host_memory.TUNABLE


def test_hint_only_without_the_tunables(monkeypatch):
    monkeypatch.setattr(host_memory, "huge_page_malloc_supported", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", host_memory.TUNABLE)
    assert host_memory.huge_page_malloc_hint() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert host_memory.TUNABLE in host_memory.huge_page_malloc_hint()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert host_memory.TUNABLE in host_memory.huge_page_malloc_hint()


@pytest.mark.skipif(not host_memory.huge_page_malloc_supported(), reason="needs glibc >= 2.35 and THP")
def test_large_allocations_fault_far_fewer_pages():
    def faults(tunables: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _ALLOCATE],
            env={"GLIBC_TUNABLES": tunables},
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout)

    plain = faults("glibc.malloc.hugetlb=0")
    huge_pages = faults(host_memory.TUNABLES[0])
    reused = faults(host_memory.TUNABLE)
    assert plain > 10 * 2**28 // 4096 * 0.9  # one fault per 4 KiB page touched, every time
    assert huge_pages * 20 < plain, (huge_pages, plain)  # one per 2 MiB page, every time
    assert reused * 20 < huge_pages, (reused, huge_pages)  # none: the heap keeps the block for the next
