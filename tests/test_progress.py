"""Progress reads well both on a terminal and in a log file."""

import io

from hdm._progress import bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_whole_lines():
    log = io.StringIO()
    for _ in bar(range(200), desc="train", stream=log):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # One line when it starts and one when it ends, not one per step.
    assert len(lines) == 2 and lines[0].startswith("train: 0/200") and lines[-1].startswith("train: 200/200 (100%)")


def test_on_a_terminal_progress_is_a_live_bar():
    screen = Terminal()
    for _ in bar(range(3), desc="train", stream=screen):
        pass
    assert "\r" in screen.getvalue()


def test_disabled_progress_writes_nothing():
    log, screen = io.StringIO(), Terminal()
    for stream in (log, screen):
        for _ in bar(range(3), desc="train", enabled=False, stream=stream):
            pass
    assert log.getvalue() == "" and screen.getvalue() == ""
