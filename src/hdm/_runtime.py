"""Process-wide settings that the `hdm` command and the bench scripts apply; importing hdm never does."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    Training frees and reallocates tensors of about 10 MB hundreds of times a step, inference the
    encoder's activations of up to 100 MB a batch. Under glibc's default thresholds many become
    fresh mappings whose pages the kernel faults in and zeroes on every use (2 million page faults
    in a 40-step fit). Setting the thresholds changes no number, only the time: bench/speed.py
    times `hdm predict` with and without it, and the README gives a fit's figures. Both must be
    set: fixing only the trim threshold also freezes the mmap threshold at its 128 KiB default,
    which made a fit 2.4x slower. The price is that memory freed after a peak stays with the
    process. Returns whether it applied: only on glibc, and not where the environment sets
    HDM_KEEP_FREED_MEMORY=0.
    """
    if not sys.platform.startswith("linux") or os.environ.get("HDM_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
