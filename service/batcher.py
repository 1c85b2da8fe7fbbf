"""The micro-batcher: concurrent requests are coalesced into batches, each one model forward.

Requests put their images (one uint8 tensor per request, never split) on a bounded queue. One
worker task takes what is queued into a batch and runs its forward on one of ``lanes`` inference
threads, off the event loop; each request gets its rows of the result. ``infer(images, group,
cores)`` scores a batch: ``group`` is the one its requests named (the server's: the bundle each
started on; requests of different groups never share a batch, so a hot swap never mixes two
guards in one forward), ``cores`` how many of the lanes' cores the batch may use.

Lanes: with one, batches run one after the other, up to ``max_batch_size`` images each. With
several (the server's concurrent batches on CPU: one per core), up to that many batches run at
once, each on one core with up to ``max_batch_size / lanes`` images, so that at most
``max_batch_size`` images are in the forwards. A lane that finishes takes the next queued
requests at once; it never waits for a slower one (a core shared with the event loop, say). A
lone request with nothing else queued takes every free lane (``cores`` > 1: the engine may then
spread it over those cores), and a small batch of several requests (up to ``spread_up_to``
images, which the engine runs on two threads) waits for every lane and takes them all; a request
larger than the lane's share runs alone, as one batch.

Batches form while the lanes are busy: requests that waited for a lane are taken together, and
may wait up to ``max_wait_ms`` (counted from the oldest one's arrival) for more to fill the
batch. A request that finds a lane free runs at once unless other requests are already on their
way (``upstream``: being decoded), and then it waits for those only: a lone request never waits.

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
                 on_queue_depth: Callable[[int], None] | None = None, upstream: Callable[[], int] | None = None,
                 lanes: int = 1, spread_up_to: int = 0):
        if lanes < 1:
            raise ValueError(f"a batcher needs at least one lane, got {lanes}")
        self._infer = infer
        self.lanes = lanes
        self.spread_up_to = spread_up_to
        self._free_lanes = lanes
        self._running: set[asyncio.Task] = set()
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

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._closing

    @property
    def lane_batch_size(self) -> int:
        """Most images of one lane's batch (a larger single request still runs alone)."""
        return -(-self.max_batch_size // self.lanes)

    @property
    def idle(self) -> bool:
        """Nothing queued and no forward running."""
        return not self._queue and self._free_lanes == self.lanes

    def has_room(self, images: int) -> bool:
        return self._queued_images + images <= self.max_queue

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.lanes,
                                                                thread_name_prefix="badexpert-infer")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="badexpert-batcher")

    async def submit(self, images: torch.Tensor, group: object = None) -> GuardScores:
        """Scores of ``images`` (N, 3, H, W) uint8, from a batch shared with concurrent requests of the
        same ``group``."""
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

    async def _wait_for_more(self, deadline: float, idle: bool, cap: int) -> None:
        while self._queued_images < cap and not self._closing:
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

    def _take(self, cap: int) -> list[_Item]:
        batch = [self._queue.popleft()]
        size = batch[0].size
        while self._queue and size + self._queue[0].size <= cap and \
                self._queue[0].group is batch[0].group:
            item = self._queue.popleft()
            batch.append(item)
            size += item.size
        self._queued_images -= size
        self._on_queue_depth(self._queued_images)
        return batch

    def _lanes_for_next(self) -> int:
        """How many lanes the next batch takes now (0: it waits for more lanes). A lone request (the only
        one queued) takes every free lane at once: the engine may spread it over their cores. A small
        batch (up to ``spread_up_to`` images, where the engine runs two threads) waits for every lane
        and takes them all, as with one lane. Any other batch takes one lane."""
        if not self._queue or not self._free_lanes:
            return 0
        if len(self._queue) == 1:
            return self._free_lanes
        if min(self._queued_images, self.lane_batch_size) <= self.spread_up_to:
            return self.lanes if self._free_lanes == self.lanes else 0
        return 1

    async def _run(self) -> None:
        try:
            while True:
                idle = not self._queue  # nothing waited for a lane: run the next request at once
                while not self._lanes_for_next():
                    if self._closing and not self._queue:
                        return
                    idle = idle and not self._queue  # a request that waited for a lane waits for others too
                    self._wakeup.clear()
                    await self._wakeup.wait()
                cap = self.lane_batch_size
                if self.max_wait > 0:
                    await self._wait_for_more(self._queue[0].arrived + self.max_wait, idle, cap)
                cores = self._lanes_for_next()  # the queue may have grown while it waited
                if not cores:
                    continue
                batch = [item for item in self._take(cap) if not item.future.done()]  # done: the client went away
                if not batch:
                    continue
                self._free_lanes -= cores
                task = asyncio.get_running_loop().create_task(self._run_batch(batch, cores))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)

    async def _run_batch(self, batch: list[_Item], cores: int) -> None:
        """``batch`` through ``infer`` on ``cores`` lanes (None to ``infer`` when it has them all); the
        lanes are free again, and the worker woken, as soon as the forward ends."""
        loop = asyncio.get_running_loop()
        images = batch[0].images if len(batch) == 1 else torch.cat([item.images for item in batch])
        try:
            scores = await loop.run_in_executor(self._executor, self._infer, images, batch[0].group,
                                                None if cores == self.lanes else cores)
            self._on_batch(len(images))
        except Exception as error:  # the requests get the error; the worker goes on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        finally:
            self._free_lanes += cores
            self._wakeup.set()
        start = 0
        columns = vars(scores)
        for item in batch:
            stop = start + item.size
            if not item.future.done():
                item.future.set_result(type(scores)(**{name: value[start:stop] for name, value in columns.items()}))
            start = stop
