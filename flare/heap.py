"""Freed memory kept in the process for the next tensor, instead of handed back to the kernel.

Torch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above a threshold (128 KiB at
first, raised adaptively) with a fresh ``mmap`` and trims the heap's free top back to the kernel, so a decoding
process that frees and makes state-sized temporaries (an 8 MB recurrent state a layer at 8 sequences, a
prefill's [T, 8,224] projections) touches new pages again and again, and on a virtual machine each page's first
touch is a fault of several microseconds. Measured on a 0.75B Qwen3.5 shape (bf16, two threads, AMX Xeon VM): a
512-token prefill made 115,000-220,000 page faults and took 1,117-1,155 ms (one run 2,837); with the settings
below none after the first and 958-965 ms; a whole ``decode()`` of 8 sequences, causal, 0.85x the time. A
decode step's time does not change (it makes no large temporaries).

``keep_freed_memory`` serves blocks up to 32 MiB (glibc's largest mmap threshold) from the heap and trims it only
above 2 GiB free: the process keeps what it freed, up to its peak use (the price; vLLM's CPU backend preloads
tcmalloc for the same reason). Other C libraries, or ``FLARE_KEEP_FREED_MEMORY=0``, leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

KEEP_FREED_MEMORY_ENV = "FLARE_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 64 << 20))


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks up to 32 MiB for reuse (see the module docstring); returns whether
    it did (False on another C library or with ``FLARE_KEEP_FREED_MEMORY=0``). Call it early in a process: blocks
    allocated before keep their mapping."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
