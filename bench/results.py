"""The bench's cached result files: the newest one per guard.

A changed build setting gives a guard a new cache key, so a new result file; the old file stays on
disk. The tables read the newest file of each guard, whatever its key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def newest_per_guard(folder: Path, guard: Callable[[dict], tuple | None]) -> dict[tuple, dict]:
    """``{guard(result): result}`` over ``folder``'s JSON files, the most recently written winning;
    a result whose ``guard`` is None is left out. Sorted by guard."""
    newest: dict[tuple, dict] = {}
    for path in sorted(folder.glob("*.json"), key=lambda path: path.stat().st_mtime):
        result = json.loads(path.read_text())
        key = guard(result)
        if key is not None:
            newest[key] = result
    return dict(sorted(newest.items()))
