"""The serving engines (defense/engine.py) score exactly as the eager guard does, fall back to it
when a model cannot be traced faithfully, and the server's inference path (thread budget by batch
size, CUDA streams) is exercised without a GPU."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
import torch.nn as nn

from defense.engine import ENGINES, build_engine
from defense.guard import Guard
from defense.models import create_model
from synthetic import PREPROCESSING, add_trigger, make_images


def random_guard(arch: str = "tiny_cnn", size: int = 16, seed: int = 0) -> Guard:
    torch.manual_seed(seed)
    models = [create_model(arch, 4).eval() for _ in range(3)]
    for model in models:  # non-trivial BatchNorm statistics, so that folding them is tested
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    preprocessing = PREPROCESSING if size == 16 else type(PREPROCESSING)((size, size), PREPROCESSING.mean,
                                                                         PREPROCESSING.std)
    return Guard(*models, preprocessing=preprocessing, rejection_threshold=1.0)


def samples(size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator) for n in (2, 1, 5)]


@pytest.mark.parametrize("name", [name for name in ENGINES if name != "eager"])
@pytest.mark.parametrize("arch, size", [("tiny_cnn", 16), ("cifar_resnet_compact", 32)])
def test_engine_scores_match_the_eager_guard_and_decide_the_same(name, arch, size):
    guard = random_guard(arch, size)
    fallbacks = []
    engine = build_engine(guard, name, samples(size), on_fallback=fallbacks.append)
    assert engine.name == name and not fallbacks
    images, _ = make_images(96, seed=5)
    if size != 16:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size)).round().to(torch.uint8)
    images = torch.cat([images, add_trigger(images[:32])])
    expected = guard.score_batch(images)
    ordered = expected.score.sort().values  # tau in the widest gap between the middle half's scores:
    middle = ordered[len(ordered) // 4: 3 * len(ordered) // 4]  # a score exactly at tau would be a coin toss
    gap = int((middle[1:] - middle[:-1]).argmax())
    guard.rejection_threshold = float((middle[gap] + middle[gap + 1]) / 2)
    for batch in (images[:1], images[:7], images):
        got, want = engine(batch), guard.score_batch(batch)
        assert torch.equal(got.label, want.label)
        assert torch.allclose(got.score, want.score, rtol=1e-5, atol=0)
        assert torch.allclose(got.confidence, want.confidence, rtol=1e-5, atol=1e-7)
        assert torch.equal(guard.rejects(got.score), guard.rejects(want.score))
        assert got.score.dtype == torch.float64 and got.label.device.type == "cpu"


class BakedBatch(nn.Module):
    """Traces with its batch size baked in (a Python int from the shape)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x):
        pooled = x.mean(dim=(2, 3))
        return self.linear(pooled) * torch.ones(int(x.shape[0]), 1)


def test_an_engine_that_does_not_match_falls_back_to_eager_and_says_why():
    guard = Guard(BakedBatch(), BakedBatch(), BakedBatch(), PREPROCESSING, rejection_threshold=0.5)
    heard = []
    engine = build_engine(guard, "jit", samples(), on_fallback=heard.append)
    assert engine.name == "eager" and len(heard) == 1 and "engine jit not used" in heard[0]
    images = samples()[2]
    assert torch.equal(engine(images).score, guard.score_batch(images).score)
    with pytest.raises(ValueError, match="unknown engine"):
        build_engine(guard, "onnx", samples())


# ----- the server's inference path ---------------------------------------------------------------


@pytest.mark.parametrize("arch, size", [("tiny_cnn", 16), ("cifar_resnet_compact", 32)])
def test_the_jit_engines_parallel_graph_serves_small_batches_and_scores_as_eager(arch, size):
    from defense.feature_fit import fit_guard_features

    guard = random_guard(arch, size)
    images = torch.randint(0, 256, (40, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    fit_guard_features(guard, images[:32], images[32:], 4, "fused")  # M's tapped activations come out of the fork graph too
    fallbacks = []
    engine = build_engine(guard, "jit", samples(size), on_fallback=fallbacks.append, parallel_up_to=4)
    assert engine.name == "jit" and engine.parallel_up_to == 4 and not fallbacks
    assert "fork" in str(engine._small_forwards.graph) and "fork" not in str(engine._forwards.graph)
    for graph in (engine._small_forwards.graph, engine._forwards.graph):  # the score is in the graphs too
        assert "aten::logsumexp" in str(graph) and "aten::matmul" in str(graph)
    for batch in (images[:1], images[:4], images[:5]):  # parallel, parallel, serial
        got, want = engine(batch), guard.score_batch(batch)
        assert torch.equal(got.label, want.label) and torch.equal(guard.rejects(got.score), guard.rejects(want.score))
        for name, column in vars(want).items():
            assert getattr(got, name).dtype == column.dtype, name
            assert torch.allclose(getattr(got, name), column, rtol=1e-5, atol=0, equal_nan=True), name
    assert build_engine(guard, "jit", samples(size)).parallel_up_to == 0  # only when asked for


def test_the_jit_engine_cuts_large_batches_into_slices_that_score_as_eager():
    from defense.engine import SlicedForwards
    from defense.feature_fit import fit_guard_features

    guard = random_guard("tiny_cnn", 16)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    fit_guard_features(guard, images[:32], images[32:], 4, "fused")
    fallbacks = []
    engine = build_engine(guard, "jit", samples(16), on_fallback=fallbacks.append, parallel_up_to=2, split_ways=3)
    assert engine.name == "jit" and engine.split_ways == 3 and engine.parallel_up_to == 2 and not fallbacks
    calls = []
    sliced = engine._sliced
    sliced.forwards = lambda part, serial=sliced.forwards: calls.append(len(part)) or serial(part)
    slices = {1: [], 2: [], 3: [1, 1, 1], 7: [3, 2, 2], 40: [14, 13, 13]}  # 1 and 2: the parallel graph
    for size in slices:
        calls.clear()
        got, want = engine(images[:size]), guard.score_batch(images[:size])
        assert sorted(calls, reverse=True) == slices[size]
        assert torch.equal(got.label, want.label) and torch.equal(guard.rejects(got.score), guard.rejects(want.score))
        assert torch.allclose(got.score, want.score, rtol=1e-5, atol=0)
        assert torch.allclose(got.feature_score, want.feature_score, rtol=1e-5, atol=0)
    over = build_engine(guard, "jit", samples(16), split_ways=2, sliced_over=4)  # no parallel graph: serial up to 4
    over._sliced.forwards = lambda part, serial=over._sliced.forwards: calls.append(len(part)) or serial(part)
    calls.clear()
    over(images[:4]), over(images[:5])
    assert calls == [3, 2]
    assert build_engine(guard, "jit", samples(16)).split_ways == 1  # only when asked for
    assert build_engine(guard, "fused", samples(16), split_ways=2).split_ways == 1  # a jit graph only
    with pytest.raises(ValueError, match="at least 2"):
        SlicedForwards(engine._forwards, 1)


def test_the_server_slices_large_batches_on_cpu_with_two_or_more_large_batch_threads(tiny):
    threads = torch.get_num_threads()
    cases = (({}, 2), ({"slice_batches": False}, 1), ({"torch_threads": 1}, 1), ({"torch_threads": 3}, 3),
             ({"engine": "eager"}, 1), ({"parallel_forwards": False}, 2))
    try:
        for overrides, expected in cases:
            torch.set_num_threads(2)
            service = loaded_service(tiny.bundle, warmup=False, **overrides)
            assert service.live.engine.split_ways == expected, overrides
            assert service.live.engine.sliced_over == (8 if expected > 1 else 0)  # the small batches' size
            batching = service.live.info["batching"]
            assert batching["large_batch_slices"] == expected
            assert batching["torch_threads"][1] == (1 if expected > 1 else torch.get_num_threads())
            large = torch.zeros(9, 3, 16, 16, dtype=torch.uint8)
            service.infer(large)  # the inference thread's own torch threads for a large batch
            assert torch.get_num_threads() == (1 if expected > 1 else (overrides.get("torch_threads") or 2))
            service._decode_pool.shutdown()
            service._audit_pool.shutdown()
    finally:
        torch.set_num_threads(threads)


def test_the_server_runs_small_batches_on_the_parallel_graph_only_with_one_small_batch_thread(tiny):
    threads = torch.get_num_threads()
    cases = (({}, 8), ({"parallel_forwards": False}, 0), ({"small_batch_threads": 2}, 0), ({"small_batch_size": 3}, 3),
             ({"torch_threads": 1}, 0))  # one torch thread in all: the fork would add a second
    try:
        for overrides, expected in cases:
            torch.set_num_threads(2)  # as on two cores (the suite runs on one thread)
            service = loaded_service(tiny.bundle, warmup=False, **overrides)
            assert service.live.engine.parallel_up_to == expected, overrides
            assert service.live.info["batching"]["parallel_forwards_up_to"] == expected
            service._decode_pool.shutdown()
            service._audit_pool.shutdown()
    finally:
        torch.set_num_threads(threads)


def loaded_service(bundle, **overrides):
    from test_service import settings

    from service.guard_service import GuardService

    service = GuardService(settings(bundle, **overrides))
    service.load()
    return service


class SpyEngine:
    """The served engine, recording each batch's size and the calling thread's torch threads."""

    def __init__(self, engine, seen):
        self.engine, self.seen, self.threads_for, self.thread_safe = engine, seen, engine.threads_for, engine.thread_safe

    def __call__(self, images, cores=None):
        self.seen.append((len(images), torch.get_num_threads()))
        return self.engine(images, cores)


@pytest.mark.parametrize("sliced, merged, large_batch_threads", [(False, 0, 2), (True, 0, 1), (True, 1, 1)])
def test_small_batches_run_on_their_own_thread_count(tiny, sliced, merged, large_batch_threads, monkeypatch):
    import defense.engine

    monkeypatch.setattr(defense.engine, "fastest_seconds", lambda functions, images: [0.0] * len(functions))  # merged: no slower
    service = loaded_service(tiny.bundle, small_batch_size=2, small_batch_threads=1, torch_threads=2, warmup=False,
                             slice_batches=sliced, merged_batch_size=merged)
    live = service.live
    assert live.engine.name == "jit" and live.info["batching"]["engine"] == "jit"  # the default on CPU
    assert live.engine.merged_up_to == merged == live.info["batching"]["merged_network_up_to"]
    assert live.engine.pair_up_to == merged == live.info["batching"]["merged_pair_up_to"]
    seen = []
    live.engine = SpyEngine(live.engine, seen)
    images = torch.stack([live.guard.preprocessing.load(path) for path in tiny.files])
    results = []
    worker = threading.Thread(target=lambda: results.extend(service.infer(batch) for batch in
                                                            (images[:1], images[:2], images[:5], images[:1])))
    worker.start()
    worker.join(60)
    assert seen == [(1, 1), (2, 1), (5, large_batch_threads), (1, 1)]  # the merged network too: one thread
    assert torch.allclose(results[2].score, tiny.scores[:5].double(), rtol=1e-5)
    service._decode_pool.shutdown()
    service._audit_pool.shutdown()


class FakeStream:
    """Stands in for torch.cuda.Stream on the CPU: records what the inference path asks of it."""

    def __init__(self, log):
        self.log = log

    def wait_stream(self, other):
        self.log.append(("wait", id(self), id(other)))


def test_the_cuda_streams_path_scores_like_the_eager_guard_without_a_gpu(tiny, monkeypatch):
    service = loaded_service(tiny.bundle, engine="eager", warmup=False)
    log = []
    current = FakeStream(log)
    service.live.streams = [FakeStream(log) for _ in range(3)]
    entered = []

    @contextlib.contextmanager
    def on_stream(stream):
        entered.append(stream)
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: log.append(("record", id(stream))))
    images = torch.stack([service.live.guard.preprocessing.load(path) for path in tiny.files])
    got = service.infer(images)
    assert entered == service.live.streams  # each model on its own stream
    waits = [entry for entry in log if entry[0] == "wait"]
    assert len(waits) == 6  # each stream waits for the current one, and the current one for each stream
    assert torch.allclose(got.score, tiny.scores.double(), rtol=1e-5) and torch.equal(got.label, tiny.labels)
    service._decode_pool.shutdown()
    service._audit_pool.shutdown()


def test_an_idle_server_decodes_small_images_on_the_event_loop_and_large_ones_in_the_threads(tiny):
    import concurrent.futures
    import io

    from PIL import Image
    from test_service import multipart, serving

    from service.guard_service import INLINE_PIXELS

    class CountingPool(concurrent.futures.ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):
            CountingPool.submitted += 1
            return super().submit(*args, **kwargs)

    with serving(tiny.bundle) as client:
        service = client.app.state.service
        service._decode_pool.shutdown()
        service._decode_pool = CountingPool(1)
        small = client.post("/predict", files=multipart(tiny.files[:1]))
        assert small.status_code == 200 and CountingPool.submitted == 0
        buffer = io.BytesIO()
        Image.new("RGB", (1024, INLINE_PIXELS // 1024 + 1), (90, 20, 200)).save(buffer, format="PNG")
        large = client.post("/predict", files=[("file", ("big.png", buffer.getvalue(), "image/png"))])
        assert large.status_code == 200 and CountingPool.submitted == 1
        assert client.post("/predict", files=[("file", ("bad.png", b"not an image", "image/png"))]).status_code == 422
        assert CountingPool.submitted == 2  # what Pillow cannot open is left to the threads, which give the error


def test_an_idle_batcher_waits_only_for_requests_on_their_way():
    import asyncio

    from defense.score import GuardScores
    from service.batcher import MicroBatcher

    def infer(images, *context):  # context: the group and the cores
        batches.append(len(images))
        zeros = torch.zeros(len(images))
        return GuardScores(zeros.long(), zeros, zeros.double(), zeros.double(), zeros.double(), zeros.double(), zeros.double())

    async def scenario(upstream: int) -> float:
        on_the_way = [upstream]
        batcher = MicroBatcher(infer, max_batch_size=8, max_wait_ms=2000, max_queue=64, upstream=lambda: on_the_way[0])
        batcher.start()
        started = asyncio.get_running_loop().time()
        first = asyncio.create_task(batcher.submit(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)))
        await asyncio.sleep(0.2)
        on_the_way[0] = 0  # the request being decoded arrives
        second = asyncio.create_task(batcher.submit(torch.zeros(2, 3, 2, 2, dtype=torch.uint8)))
        await asyncio.gather(first, second)
        await batcher.close()
        return asyncio.get_running_loop().time() - started

    batches = []
    assert asyncio.run(scenario(upstream=0)) < 1.5 and batches == [1, 2]  # a lone request runs at once
    batches = []
    elapsed = asyncio.run(scenario(upstream=1))  # one request is being decoded: the first waits for it
    assert batches == [3] and 0.2 <= elapsed < 1.5
