"""Timing, memory and the command line shared by the benches, free of hdm's imports: bench/peers_anomalib.py runs
in the peers' environment."""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run in a process of its own, so that the peak is the command's alone and not that of any other child.
_PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def command_line() -> str:
    """The command that ran this bench, as its table names it: `python bench/NAME.py ARGS`."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def median_rate(fn, count: int, repeats: int) -> float:
    """Items per second of `fn`, which handles `count` items: one warm-up call, then the median of `repeats`."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return count / statistics.median(times)


def measured_run(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `command`."""
    started = time.perf_counter()
    rss = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], check=True, capture_output=True, text=True,
                         env=env).stdout
    return time.perf_counter() - started, int(rss.strip()) / 1024
