"""Huge-page malloc: the environment it sets, and that it removes the page faults of large allocations."""
import json
import subprocess
import sys

import pytest

from mvlp_jax import host_memory

# Mallocs and touches 256 MB five times, as XLA:CPU does a step's temporaries (glibc serves each from a fresh
# mmap), and reports the minor page faults. Plain libc malloc: numpy madvises its own large arrays already.
_ALLOCATE = """
import ctypes, json, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block = libc.malloc(2 ** 28)
    ctypes.memset(block, 1, 2 ** 28)
    libc.free(block)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def test_environment_keeps_other_tunables_and_an_explicit_choice():
    assert host_memory.with_huge_page_malloc({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": host_memory.TUNABLE}
    merged = host_memory.with_huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert merged["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}"
    assert host_memory.with_huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


def test_hint_only_without_the_tunable(monkeypatch):
    monkeypatch.setattr(host_memory, "huge_page_malloc_supported", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", host_memory.TUNABLE)
    assert host_memory.huge_page_malloc_hint() is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in host_memory.huge_page_malloc_hint()


@pytest.mark.skipif(not host_memory.huge_page_malloc_supported(), reason="needs glibc >= 2.35 and THP")
def test_large_allocations_fault_far_fewer_pages():
    def faults(env: dict) -> int:
        out = subprocess.run([sys.executable, "-c", _ALLOCATE], env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    plain = faults({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    huge = faults(host_memory.with_huge_page_malloc({}))
    assert plain > 5 * 2 ** 28 // 4096 * 0.9  # one fault per 4 KiB page touched
    assert huge * 20 < plain, (huge, plain)
