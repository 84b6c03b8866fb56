"""How often long work prints a plain progress line when its output is not a terminal (where rich's bar
shows nothing until the end): one interval for every stage, extract, shard and train alike."""

from __future__ import annotations

import math
import os

from userpipe.schemas.errors import InputError

PROGRESS_SECONDS = 30.0  # off a terminal: a plain progress line this often (env USERPIPE_PROGRESS_SECONDS)
PROGRESS_ENV = "USERPIPE_PROGRESS_SECONDS"


def progress_seconds() -> float:
    """The interval between plain progress lines: PROGRESS_SECONDS, or the environment's."""
    value = os.environ.get(PROGRESS_ENV)
    if value is None:
        return PROGRESS_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InputError(f"{PROGRESS_ENV}={value!r} is not a number of seconds (0 or more)")
    return seconds
