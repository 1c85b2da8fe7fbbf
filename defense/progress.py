"""Progress bars that only draw on a terminal: piped into a log, a long step prints nothing but
the one summary line its caller logs, instead of hundreds of partial bar lines."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **options) -> tqdm:
    """``tqdm`` that is off when ``enabled`` is False, and off on a pipe or a file either way."""
    return tqdm(iterable, disable=None if enabled else True, **options)
