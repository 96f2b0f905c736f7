"""Progress for long work (eval documents and settings, bench rounds, calibration batches, the
GGUF conversion) on stderr: a tqdm bar when stderr is a terminal; otherwise (a log file, a pipe)
a plain line at most once every ``LINE_EVERY`` seconds; nothing after ``set_quiet(True)`` (the CLI's
``--quiet``)."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")

QUIET = False  # set by the CLI's --quiet
LINE_EVERY = 60.0  # seconds between two progress lines when stderr is not a terminal


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal and --quiet was not given."""
    return not QUIET and sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it") -> Iterable[T]:
    """``iterable``, drawing a bar with a time estimate on stderr while it is consumed (when
    ``enabled()``); the bar is cleared when done, so what stays on the screen is the results. When
    stderr is not a terminal (and not quiet), a line such as ``settings: 2/5, 04:10 elapsed,
    about 06:15 left`` at most every ``LINE_EVERY`` seconds instead."""
    if QUIET:
        return iterable
    if enabled():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _lines(iterable, total, desc)


def _lines(iterable: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """``progress`` for a log file: after an item, a line when ``LINE_EVERY`` seconds have passed
    since the start or the last line."""
    start = last = time.monotonic()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= LINE_EVERY:
            last = now
            elapsed = now - start
            left = f", about {tqdm.format_interval(elapsed * (total - done) / done)} left" if total else ""
            print(f"{desc}: {done}/{total or '?'}, {tqdm.format_interval(elapsed)} elapsed{left}",
                  file=sys.stderr, flush=True)


def set_quiet(quiet: bool) -> None:
    """The CLI's switch. When bars are off (``quiet``, or stderr not a terminal), transformers' own
    bars (loading and writing weights) are turned off too; they are never turned back on here."""
    global QUIET
    QUIET = quiet
    if not enabled():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
