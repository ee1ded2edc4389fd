"""Messages: one-line error text, and quieting third-party chatter (orbax and tfds log through absl; orbax's
background reads report their errors as tracebacks) where jdiff reports the outcome itself. Every switch
here is a context manager that restores what it changed."""

import contextlib
import logging
import os
import sys
import warnings


def one_line(e: BaseException, limit: int = 0) -> str:
    """The exception's text on one line (whitespace collapsed), cut to `limit` characters when limit > 0."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if not limit or len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_absl(quiet: bool = True):
    """Raises the absl logger's level to ERROR inside the block (when `quiet`), then restores it."""
    logger = logging.getLogger("absl")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _closed_loop_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).partition("\n")[0].endswith("exception was never retrieved")


def _orbax_thread_traceback(record: logging.LogRecord) -> bool:
    # orbax logs each failed background save thread with its traceback (four times for one full disk); the
    # failure is raised again at the next save or wait, where jdiff reports it in one line.
    failed_thread = record.levelno >= logging.ERROR and record.exc_info is not None
    return not (failed_thread and f"{os.sep}orbax{os.sep}" in record.pathname)


def filter_failed_read_noise():
    """Drops exactly the tracebacks that a failed orbax read's still-running background reads print later
    (unraisable "Event loop is closed" errors, asyncio's "... exception was never retrieved" records and the
    "coroutine ... was never awaited" warnings of its abandoned coroutines),
    and the tracebacks orbax logs for a failed background save (which it raises again at the next save or
    wait), for tools that report the failure themselves in one line. Other exceptions and records pass
    through. Returns a function that restores the previous hooks.

    The records arrive until interpreter shutdown, after a command line's main() has returned, so the
    scripts' entry points (`jdiff.cli.common.run_script`) install it for their process and never restore it;
    library code does not call it."""
    default = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            default(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_closed_loop_noise)
    logging.getLogger("absl").addFilter(_orbax_thread_traceback)
    saved_filters = warnings.filters[:]
    # A failed read's abandoned tensorstore coroutines are collected at exit ("coroutine
    # 'Store._get_array_metadatas' was never awaited"); jdiff itself has no coroutines.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)

    def restore():
        warnings.filters[:] = saved_filters
        logging.getLogger("absl").removeFilter(_orbax_thread_traceback)
        logging.getLogger("asyncio").removeFilter(_closed_loop_noise)
        sys.unraisablehook = default

    return restore
