"""Progress bars for long work (eval documents and settings, bench rounds, calibration batches, the
GGUF conversion): tqdm on stderr, off when stderr is not a terminal or after ``set_quiet(True)``
(the CLI's ``--quiet``)."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")

QUIET = False  # set by the CLI's --quiet


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal and --quiet was not given."""
    return not QUIET and sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it") -> Iterable[T]:
    """``iterable``, drawing a bar with a time estimate on stderr while it is consumed (when
    ``enabled()``); the bar is cleared when done, so what stays on the screen is the results."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(), leave=False,
                dynamic_ncols=True)


def set_quiet(quiet: bool) -> None:
    """The CLI's switch. When bars are off (``quiet``, or stderr not a terminal), transformers' own
    bars (loading and writing weights) are turned off too; they are never turned back on here."""
    global QUIET
    QUIET = quiet
    if not enabled():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
