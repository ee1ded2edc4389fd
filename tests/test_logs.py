"""The command lines' noise filter (`jdiff._logs.filter_failed_read_noise`): it drops exactly the third-party
chatter that follows a failure jdiff reports in one line, and nothing else."""

import logging
import os
import subprocess
import sys

from conftest import REPO

from jdiff._logs import filter_failed_read_noise

DROPPED_COROUTINE = """
import gc
{install}
async def abandoned():
    pass
abandoned()  # never awaited, as tensorstore's reads after a failed restore
gc.collect()
"""


def _stderr(install: str) -> str:
    code = DROPPED_COROUTINE.format(install=install)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stderr


def test_never_awaited_coroutine_warnings_are_dropped():
    assert "was never awaited" in _stderr("")  # what the filter is for
    assert _stderr("from jdiff._logs import filter_failed_read_noise; filter_failed_read_noise()") == ""


def _record(pathname: str, level: int, exc: bool) -> logging.LogRecord:
    info = (ValueError, ValueError("No space left on device"), None) if exc else None
    return logging.LogRecord("absl", level, pathname, 1, "thread failed", None, info)


def test_only_orbax_failed_thread_tracebacks_are_dropped():
    absl = logging.getLogger("absl")
    orbax = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "future.py")
    restore = filter_failed_read_noise()
    try:
        assert not absl.filter(_record(orbax, logging.ERROR, exc=True))
        assert absl.filter(_record(orbax, logging.ERROR, exc=False))  # a plain orbax error line stays
        assert absl.filter(_record(orbax, logging.WARNING, exc=True))
        assert absl.filter(_record(os.path.join(os.sep, "jdiff", "x.py"), logging.ERROR, exc=True))
    finally:
        restore()
    assert absl.filter(_record(orbax, logging.ERROR, exc=True))  # restored
