"""The micro-batcher: concurrent requests are coalesced into one model forward.

Requests put their images (one uint8 tensor per request, never split) on a bounded queue. One
worker task takes what is queued, up to ``max_batch_size`` images, runs the forward in a single
inference thread, off the event loop, and hands each request its rows of the result. A request
larger than ``max_batch_size`` runs alone, as one batch. A request may name a ``group`` (the
server's: the bundle it started on): requests of different groups never share a batch, and
``infer(images, group)`` gets the group, so a hot swap never mixes two guards in one forward.

Batches form while the model is busy: requests that arrive during a forward are taken together
when it ends, and may wait up to ``max_wait_ms`` (counted from the oldest one's arrival) for more
to fill the batch. The first request of an idle period runs at once unless other requests are
already on their way (``upstream``: being decoded), and then it waits for those only: a lone
request never waits.

A full queue refuses at once (:class:`Overloaded`, the server's 503 with Retry-After); it never
waits. :meth:`MicroBatcher.close` stops accepting and finishes what is queued.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Callable

import torch

from defense.score import GuardScores


class Overloaded(Exception):
    """The queue is full: try again later."""


class ShuttingDown(Exception):
    """The server is draining and accepts no new work."""


@dataclass
class _Item:
    images: torch.Tensor
    future: asyncio.Future
    arrived: float
    group: object = None

    @property
    def size(self) -> int:
        return len(self.images)


class MicroBatcher:
    def __init__(self, infer: Callable[..., GuardScores], max_batch_size: int, max_wait_ms: float,
                 max_queue: int, on_batch: Callable[[int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None, upstream: Callable[[], int] | None = None):
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda size: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._upstream = upstream or (lambda: 0)  # requests on their way to the queue (being decoded)
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False
        self._busy = False

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._closing

    @property
    def idle(self) -> bool:
        """Nothing queued and no forward running."""
        return not self._queue and not self._busy

    def has_room(self, images: int) -> bool:
        return self._queued_images + images <= self.max_queue

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="badexpert-infer")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="badexpert-batcher")

    async def submit(self, images: torch.Tensor, group: object = None) -> GuardScores:
        """Scores of ``images`` (N, 3, H, W) uint8, from a batch shared with concurrent requests of the
        same ``group`` (scored by ``infer(images)``, or ``infer(images, group)`` when a group is given)."""
        if self._closing or self._worker is None:
            raise ShuttingDown()
        if not self.has_room(len(images)):
            raise Overloaded()
        item = _Item(images, asyncio.get_running_loop().create_future(), time.monotonic(), group)
        self._queue.append(item)
        self._queued_images += item.size
        self._on_queue_depth(self._queued_images)
        self._wakeup.set()
        return await item.future

    async def close(self) -> None:
        """Stop accepting; finish every queued request; stop the worker."""
        self._closing = True
        if self._worker is not None:
            self._wakeup.set()
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _wait_for_more(self, deadline: float, idle: bool) -> None:
        while self._queued_images < self.max_batch_size and not self._closing:
            if idle and not self._upstream():  # an idle model waits only for requests known to be coming
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                return

    def _take(self) -> list[_Item]:
        batch = [self._queue.popleft()]
        size = batch[0].size
        while self._queue and size + self._queue[0].size <= self.max_batch_size and \
                self._queue[0].group is batch[0].group:
            item = self._queue.popleft()
            batch.append(item)
            size += item.size
        self._queued_images -= size
        self._on_queue_depth(self._queued_images)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            idle = not self._queue  # nothing arrived during the last forward: run the next request at once
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_wait > 0:
                await self._wait_for_more(self._queue[0].arrived + self.max_wait, idle)
            batch = [item for item in self._take() if not item.future.done()]  # done: the client went away
            if not batch:
                continue
            images = batch[0].images if len(batch) == 1 else torch.cat([item.images for item in batch])
            self._busy = True
            try:
                group = batch[0].group
                arguments = (images,) if group is None else (images, group)
                scores = await loop.run_in_executor(self._executor, self._infer, *arguments)
                self._on_batch(len(images))
            except Exception as error:  # the requests get the error; the worker goes on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            finally:
                self._busy = False
            start = 0
            columns = vars(scores)
            for item in batch:
                stop = start + item.size
                if not item.future.done():
                    item.future.set_result(type(scores)(**{name: value[start:stop] for name, value in columns.items()}))
                start = stop
