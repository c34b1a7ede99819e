"""Huge-page malloc for CPU runs: XLA:CPU frees and re-allocates a step's temporaries (GBs for MAE B/16), so
with glibc's default 4 KiB pages every step faults them in again (660k page faults, ~3.5 CPU-s per 11 s step
here). `glibc.malloc.hugetlb=1` (glibc >= 2.35, transparent huge pages on `madvise` or `always`) backs
malloc with 2 MiB pages: the faults vanish and the step runs ~20% faster. glibc reads the tunable at
process start only, so it is set in the environment of a process to come (Makefile, benchmark workers).
"""
from __future__ import annotations

import os
import platform
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_huge_page_malloc(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` whose GLIBC_TUNABLES also asks for huge-page malloc (kept as is if already set)."""
    env = dict(env)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        env["GLIBC_TUNABLES"] = ":".join(tunables + [TUNABLE])
    return env


def huge_page_malloc_supported() -> bool:
    """Linux with glibc >= 2.35 and transparent huge pages not switched off."""
    libc, version = platform.libc_ver()
    try:
        glibc_ok = libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
        with open(_THP_MODE) as f:
            thp_ok = "[never]" not in f.read()
    except (OSError, ValueError):
        return False
    return platform.system() == "Linux" and glibc_ok and thp_ok


def huge_page_malloc_hint() -> str | None:
    """A one-line hint when this process would gain from the tunable but was started without it."""
    if "glibc.malloc.hugetlb=" in os.environ.get("GLIBC_TUNABLES", "") or not huge_page_malloc_supported():
        return None
    return (f"hint: on CPU, start with GLIBC_TUNABLES={TUNABLE} (huge-page malloc; ~20% faster steps here, "
            "see mvlp_jax/host_memory.py)")
