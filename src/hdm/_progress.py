"""Progress for people: a live bar on a terminal; off one (a log file, CI, a cluster's log, nohup) a
plain line now and then, since a bar's carriage-return redraws become one endless line in a file."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between plain lines off a terminal
_PLAIN = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left{postfix}"


class _Lines:
    """A stream for tqdm that writes each redraw as a line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, initial: int = 0,
        enabled: bool = True, stream: TextIO | None = None) -> tqdm:
    """A tqdm over `iterable` (or updated by hand with `total`): silent unless `enabled`; a bar where
    `stream` (stderr by default) is a terminal, a line per LOG_INTERVAL seconds and one at the end elsewhere."""
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if stream.isatty():
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, file=stream)
    return tqdm(iterable, desc=desc, total=total, initial=initial, file=_Lines(stream), mininterval=LOG_INTERVAL,
                maxinterval=LOG_INTERVAL, bar_format=_PLAIN, leave=True)
