"""Concurrent batches: the micro-batcher's lanes (service/batcher.py), the engine's ``cores``
(defense/engine.py), and the server's wiring of both (service/served_bundle.py, guard_service.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from defense.score import GuardScores
from service.batcher import MicroBatcher


def scores_of(images: torch.Tensor) -> GuardScores:
    """Scores whose label is each image's first pixel: which request got which row is visible."""
    label = images[:, 0, 0, 0].long()
    zeros = torch.zeros(len(images), dtype=torch.float64)
    return GuardScores(label, zeros.float(), label.double(), zeros, zeros, zeros, zeros)


def request(value: int, size: int = 1) -> torch.Tensor:
    return torch.full((size, 3, 2, 2), value, dtype=torch.uint8)


class GatedInfer:
    """``infer`` whose batches wait for ``release(n)`` before they return; records each call."""

    def __init__(self):
        self.calls: list[tuple[list[int], object, int | None]] = []
        self.inside = 0
        self.most_inside = 0
        self._gates: list[threading.Event] = []
        self._lock = threading.Lock()

    def __call__(self, images, group=None, cores=None):
        gate = threading.Event()
        with self._lock:
            self.calls.append((images[:, 0, 0, 0].tolist(), group, cores))
            self._gates.append(gate)
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        assert gate.wait(10), "the test never released this batch"
        with self._lock:
            self.inside -= 1
        return scores_of(images)

    def release(self, index: int) -> None:
        self._gates[index].set()


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def test_two_lanes_run_two_batches_at_once_and_a_free_lane_never_waits_for_the_other():
    infer = GatedInfer()

    async def scenario():
        batcher = MicroBatcher(infer, max_batch_size=4, max_wait_ms=0, max_queue=64, lanes=2)
        assert batcher.lane_batch_size == 2  # the lanes share max_batch_size
        batcher.start()
        first = [asyncio.create_task(batcher.submit(request(value))) for value in (1, 2, 3, 4)]
        await until(lambda: len(infer.calls) == 2)  # two batches of two, running together
        assert infer.most_inside == 2 and batcher.queued_images == 0
        assert [call[0] for call in infer.calls] == [[1, 2], [3, 4]]
        assert [call[2] for call in infer.calls] == [1, 1]  # each on one core
        later = [asyncio.create_task(batcher.submit(request(value))) for value in (5, 6)]
        await asyncio.sleep(0.05)
        assert len(infer.calls) == 2  # both lanes busy: the new requests wait
        infer.release(1)  # the second batch ends first: its lane takes the waiting requests at once
        await until(lambda: len(infer.calls) == 3)
        assert infer.calls[2][0] == [5, 6] and not any(task.done() for task in first[:2])
        done = await asyncio.gather(*first[2:])
        assert [int(result.label) for result in done] == [3, 4]
        infer.release(0)
        infer.release(2)
        results = await asyncio.gather(*first, *later)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [int(result.label) for result in results] == [1, 2, 3, 4, 5, 6]  # every request its own rows


def test_a_lone_request_takes_every_free_lane_and_one_queued_behind_others_one_lane():
    infer = GatedInfer()

    async def scenario():
        batcher = MicroBatcher(infer, max_batch_size=8, max_wait_ms=0, max_queue=64, lanes=3)
        batcher.start()
        alone = asyncio.create_task(batcher.submit(request(1, size=6)))  # larger than a lane's share (3)
        await until(lambda: len(infer.calls) == 1)
        assert infer.calls[0] == ([1] * 6, None, None)  # every lane: the engine's own choice (None)
        queued = asyncio.create_task(batcher.submit(request(2)))
        await asyncio.sleep(0.05)
        assert len(infer.calls) == 1  # no lane is free while the lone request holds all three
        infer.release(0)
        await until(lambda: len(infer.calls) == 2)
        assert infer.calls[1][2] is None  # free lanes again: a lone request gets them all
        infer.release(1)
        await asyncio.gather(alone, queued)
        pair = [asyncio.create_task(batcher.submit(request(value, size=2))) for value in (3, 4)]  # 2 + 2 > 3
        await until(lambda: len(infer.calls) == 4)
        assert infer.calls[2] == ([3, 3], None, 1)  # another request queued behind it: one lane
        assert infer.calls[3] == ([4, 4], None, 2)  # then alone: the two lanes left free
        infer.release(2)
        infer.release(3)
        await asyncio.gather(*pair)
        await batcher.close()

    asyncio.run(scenario())


def test_a_small_batch_waits_for_every_lane_and_a_larger_one_takes_the_free_lane():
    infer = GatedInfer()

    async def scenario():
        batcher = MicroBatcher(infer, max_batch_size=16, max_wait_ms=0, max_queue=64, lanes=2, spread_up_to=4)
        batcher.start()
        busy = [asyncio.create_task(batcher.submit(request(value, size=5))) for value in (1, 2)]
        await until(lambda: len(infer.calls) == 2)
        assert [call[2] for call in infer.calls] == [1, 1]  # 10 images queued: one lane each
        infer.release(1)
        await busy[1]  # one lane free, one busy
        small = [asyncio.create_task(batcher.submit(request(value))) for value in (3, 4)]
        await asyncio.sleep(0.05)
        assert len(infer.calls) == 2  # two images from two requests: they wait for both lanes
        infer.release(0)
        await until(lambda: len(infer.calls) == 3)
        assert infer.calls[2] == ([3, 4], None, None)  # every lane: the engine's two-thread graphs
        infer.release(2)
        await asyncio.gather(*small)
        busy = [asyncio.create_task(batcher.submit(request(value, size=5))) for value in (5, 8)]
        await until(lambda: len(infer.calls) == 5)
        infer.release(4)
        await busy[1]  # again one lane free, one busy
        larger = [asyncio.create_task(batcher.submit(request(value, size=3))) for value in (6, 7)]
        await until(lambda: len(infer.calls) == 6)  # six images: the free lane takes them at once
        assert infer.calls[5] == ([6, 6, 6, 7, 7, 7], None, 1)
        infer.release(3)
        infer.release(5)
        await asyncio.gather(busy[0], *larger)
        await batcher.close()

    asyncio.run(scenario())


def test_one_lane_keeps_one_batch_at_a_time_of_up_to_max_batch_size():
    infer = GatedInfer()

    async def scenario():
        batcher = MicroBatcher(infer, max_batch_size=4, max_wait_ms=0, max_queue=64)
        assert batcher.lanes == 1 and batcher.lane_batch_size == 4
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(request(value))) for value in range(6)]
        await until(lambda: len(infer.calls) == 1)
        await asyncio.sleep(0.05)
        assert len(infer.calls) == 1 and infer.calls[0][2] is None
        infer.release(0)
        await until(lambda: len(infer.calls) == 2)
        infer.release(1)
        await asyncio.gather(*tasks)
        await batcher.close()
        return [len(call[0]) for call in infer.calls]

    assert asyncio.run(scenario()) == [4, 2]
    with pytest.raises(ValueError, match="at least one lane"):
        MicroBatcher(infer, 4, 0, 8, lanes=0)


def test_closing_waits_for_every_running_batch_and_a_failing_batch_frees_its_lane():
    calls = []

    def infer(images, group=None, cores=None):
        calls.append(images[:, 0, 0, 0].tolist())
        time.sleep(0.05)
        if int(images[0, 0, 0, 0]) == 9:
            raise RuntimeError("forward failed")
        return scores_of(images)

    async def scenario():
        batcher = MicroBatcher(infer, max_batch_size=2, max_wait_ms=0, max_queue=64, lanes=2)
        batcher.start()
        failing = asyncio.create_task(batcher.submit(request(9)))
        with pytest.raises(RuntimeError, match="forward failed"):
            await failing
        tasks = [asyncio.create_task(batcher.submit(request(value))) for value in range(5)]
        await asyncio.sleep(0)
        await batcher.close()  # finishes what was queued, on both lanes
        assert all(task.done() for task in tasks)
        return [int(task.result().label) for task in tasks]

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]
    assert sorted(value for call in calls[1:] for value in call) == [0, 1, 2, 3, 4]


def test_one_core_runs_neither_the_parallel_graph_nor_slices():
    from test_engine import random_guard, samples

    from defense.engine import build_engine

    guard = random_guard("tiny_cnn", 16)
    engine = build_engine(guard, "jit", samples(16), parallel_up_to=2, split_ways=2, sliced_over=2)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    parts = []
    engine._sliced.forwards = lambda part, serial=engine._sliced.forwards: parts.append(len(part)) or serial(part)
    assert engine._forwards_for(2) is engine._small_forwards and engine._forwards_for(2, cores=1) is engine._forwards
    assert engine._forwards_for(6, cores=1) is engine._forwards
    whole, alone = engine(images), engine(images, cores=1)
    assert parts == [3, 3]  # cores=None: two slices; cores=1: none
    assert torch.equal(whole.label, alone.label) and torch.allclose(whole.score, alone.score, rtol=1e-5)
    parts.clear()
    engine(images, cores=5)  # more cores than the engine was built for: its own slices
    assert parts == [3, 3]
    assert engine.thread_safe and not build_engine(guard, "eager", samples(16)).thread_safe


def test_the_server_runs_one_lane_per_large_batch_thread_on_cpu(tiny):
    from test_engine import loaded_service

    from service.served_bundle import batch_lanes

    threads = torch.get_num_threads()
    cases = (({}, 2), ({"concurrent_batches": False}, 1), ({"torch_threads": 1}, 1), ({"torch_threads": 3}, 3),
             ({"engine": "eager"}, 1))  # its batches would take turns: one lane
    try:
        for overrides, expected in cases:
            torch.set_num_threads(2)
            service = loaded_service(tiny.bundle, warmup=False, **overrides)
            assert service.live.info["batching"]["concurrent_batches"] == expected, overrides
            assert batch_lanes(service.settings, service._threads[1], "cuda:0", service.live.engine) == 1  # one device
            service._decode_pool.shutdown()
            service._audit_pool.shutdown()
    finally:
        torch.set_num_threads(threads)


def test_an_engine_that_is_not_thread_safe_takes_its_batches_in_turn(tiny):
    from test_engine import loaded_service

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        service = loaded_service(tiny.bundle, warmup=False, engine="eager")
    finally:
        torch.set_num_threads(threads)
    live = service.live
    inside, most, real = [0], [0], live.engine.__class__.__call__
    lock = threading.Lock()

    def counted(engine, images, cores=None):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        try:
            return real(engine, images, cores)
        finally:
            with lock:
                inside[0] -= 1

    live.engine.__class__ = type("CountedEngine", (live.engine.__class__,), {"__call__": counted})
    images = torch.stack([live.guard.preprocessing.load(path) for path in tiny.files[:4]])
    workers = [threading.Thread(target=service.infer, args=(images, None, 1)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert most[0] == 1  # the eager guard's tap holds one batch: never two at once
    service._decode_pool.shutdown()
    service._audit_pool.shutdown()
