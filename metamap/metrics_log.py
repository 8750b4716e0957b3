"""A run's ``metrics.jsonl``: one JSON object per line, each with the ``step`` it belongs to.

Lines are appended as training goes, so a kill can cut the last one short; readers leave such a
torn last line out (with a warning). A damaged line anywhere else is refused by its number.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from metamap.errors import CheckpointError


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def read_log(path: str | Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for every record of the log at ``path`` (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()        # bytes: lines end at "\n" only, as they are written
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not text (damaged); move it away to resume without the "
                              "log of the earlier steps") from None
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            if number == len(lines):       # no newline after it: a write cut short by a kill
                warnings.warn(f"{path}: left out its last line, which was cut short ({line[:40]!r}...)",
                              stacklevel=2)
                continue
            raise CheckpointError(f"{path}, line {number}, is damaged ({line[:60]!r}): each line must be a "
                                  "JSON object with a whole-number \"step\"; repair or delete that line")
        out.append((line, record))
    return out


def read_records(path: str | Path) -> list[dict]:
    """The records of the log at ``path``; ``[]`` if there is none."""
    path = Path(path)
    return [record for _, record in read_log(path)] if path.exists() else []
