"""hdm._runtime: the malloc setting that the hdm command applies, and its off switch."""

import os
import platform
import subprocess
import sys

import pytest


def keep_freed_memory_in_fresh_process(setting: str) -> str:
    # A fresh interpreter: the setting is process-wide and must not leak into the test process.
    code = "import hdm; print(hdm.keep_freed_memory())"
    env = {**os.environ, "HDM_KEEP_FREED_MEMORY": setting}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_environment_turns_it_off():
    assert keep_freed_memory_in_fresh_process("0") == "False"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's mallopt parameters")
def test_applies_on_glibc():
    assert keep_freed_memory_in_fresh_process("1") == "True"
