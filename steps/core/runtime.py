"""The process's runtime: the allocator, torch threads, and what machine a result came from.

Kept small and free of project imports, so every entry point can call it first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator
from typing import Any

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
# Every block on the heap (no mmap: glibc caps its mmap threshold at 32 MiB, below one update's logits) and freed
# memory kept in the process: training frees and reallocates the same large activation and logits buffers at
# every update, and glibc's defaults hand each back to the kernel (munmap or trim, then page faults on the next
# touch). Measured in benchmarks/RESULTS.md.
ALLOCATOR_SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 1 << 28}

PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # autocast precision (training and decoding); each resolves auto for its device


def keep_large_allocations() -> bool:
    """Apply ALLOCATOR_SETTINGS through glibc's mallopt; False where there is no glibc (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in ALLOCATOR_SETTINGS.items())
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, restored after (tests share the process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and the ISA flags that change which kernels torch runs (and so the last bits)."""
    model, flags = "", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "asimd", "sve")
    return {"model": model or platform.machine(), "isa": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def machine(threads: int | None = None) -> dict[str, Any]:
    """Where a result was computed: CPU (or GPU), torch, threads, Python."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_description(), "torch": torch.__version__, "python": platform.python_version(),
                            "threads": threads if threads is not None else torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
