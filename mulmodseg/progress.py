"""Progress of long work for a person at a terminal or reading a log: durations as ``4m05s``, ETA lines. (The
sliding window's live counter stays in ``inferer``, which imports nothing of the package.)"""

from __future__ import annotations

import time
from typing import Callable


def format_seconds(seconds: float) -> str:
    """``3h07m``, ``4m05s`` or ``12s``."""
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def quarter_reporter(name: str, log: Callable[[str], None]) -> Callable[[int, int], None]:
    """A sliding-window ``progress(done, total)`` that logs ``name``'s window count and ETA as it passes
    25, 50 and 75% (a log file gets a few lines, not a live counter)."""
    started, logged = time.monotonic(), [0]

    def report(done: int, total: int) -> None:
        quarter = 4 * done // total
        if 0 < quarter < 4 and quarter > logged[0]:
            logged[0] = quarter
            eta = (time.monotonic() - started) / done * (total - done)
            log(f"{name}: {done}/{total} windows, ETA {eta:.0f}s")

    return report
