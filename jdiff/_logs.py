"""Quieting third-party log chatter (orbax, tfds log through absl) where jdiff reports the outcome itself."""

from __future__ import annotations

import contextlib
import logging


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
