"""Timing shared by the benches, free of hdm's imports: bench/peers_anomalib.py runs in the peers' environment."""

from __future__ import annotations

import statistics
import time


def median_rate(fn, count: int, repeats: int) -> float:
    """Items per second of `fn`, which handles `count` items: one warm-up call, then the median of `repeats`."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return count / statistics.median(times)
