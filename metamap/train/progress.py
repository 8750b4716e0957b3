"""Progress bars that behave in a terminal and in a log file alike."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it") -> tqdm:
    # Redrawn at most every 0.5 s on a terminal; in logs (no tty) every 30 s, so CI output stays short.
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, file=sys.stderr, leave=tty)
