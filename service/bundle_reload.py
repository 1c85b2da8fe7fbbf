"""Hot swap: a new bundle is loaded beside the running one and switched in without dropping a request.

:meth:`BundleReloader.reload` loads the candidate in its own thread (off the event loop) through
:func:`service.served_bundle.load_served_bundle`, the startup path (digest, weight hashes,
signature, factory allowlist, manifest values, warm-up), and only then switches, in one assignment
on the event loop: requests already in flight finish on the bundle they started on, new ones get
the new one. One reload runs at a time; a second one meanwhile is refused (:class:`ReloadBusy`). A
candidate that fails leaves the running bundle serving; the reason is logged and counted in
``badexpert_bundle_reloads_total{outcome="failure"}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from service.served_bundle import ServedBundle

log = logging.getLogger("badexpert.serve")


class ReloadBusy(Exception):
    """Another reload is under way."""


class ReloadFailed(Exception):
    """The candidate could not be loaded or verified; the running bundle keeps serving."""


@dataclass(frozen=True)
class ReloadResult:
    bundle_id: str
    previous_bundle_id: str
    path: str
    seconds: float


def first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


class BundleReloader:
    """Loads candidates one at a time in a dedicated thread and hands them to ``switch``."""

    def __init__(self, load: Callable[[Path], ServedBundle], switch: Callable[[ServedBundle], ServedBundle],
                 count: Callable[[str], None]):
        self._load, self._switch, self._count = load, switch, count
        self._busy = False
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "badexpert-reload")
        self._tasks: set[asyncio.Task] = set()

    @property
    def busy(self) -> bool:
        return self._busy

    async def load(self, folder: Path, trigger: str) -> ServedBundle:
        """The candidate at ``folder``, loaded and warm (not switched in). Raises ReloadBusy or ReloadFailed."""
        if self._busy:
            self._count("busy")
            raise ReloadBusy("another bundle reload is under way; try again when it has finished")
        self._busy = True
        try:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool, self._load, Path(folder))
            except Exception as error:
                reason = first_line(error)
                self._count("failure")
                log.error("bundle reload (%s) from %s failed; the running bundle keeps serving: %s",
                          trigger, folder, reason)
                raise ReloadFailed(reason) from None
        finally:
            self._busy = False

    async def reload(self, folder: Path, trigger: str) -> ReloadResult:
        """Load ``folder`` and switch to it. Raises ReloadBusy or ReloadFailed (the old bundle serving)."""
        started = time.monotonic()
        candidate = await self.load(folder, trigger)
        previous = self._switch(candidate)
        self._count("success")
        result = ReloadResult(candidate.bundle_id, previous.bundle_id, str(candidate.path), time.monotonic() - started)
        log.info("bundle reload (%s): now serving %s from %s (was %s; loaded in %.1f s)", trigger,
                 result.bundle_id, result.path, result.previous_bundle_id, result.seconds)
        return result

    def reload_in_background(self, folder: Path, trigger: str) -> None:
        """On the event loop (a signal's callback): start a reload; its outcome is logged and counted."""
        task = asyncio.get_running_loop().create_task(self._quiet_reload(folder, trigger), name="badexpert-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quiet_reload(self, folder: Path, trigger: str) -> None:
        try:
            await self.reload(folder, trigger)
        except ReloadBusy as error:
            log.warning("bundle reload (%s) ignored: %s", trigger, error)
        except ReloadFailed:
            pass  # logged and counted

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
