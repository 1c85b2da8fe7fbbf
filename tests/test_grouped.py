"""defense/grouped.py: M, B and M' merged into one network (or M and B alone) compute exactly the models'
logits and M's tapped activations; what the merge does not rewrite is refused (None), and the jit
engine serves small batches with it (the three merged on one thread, or M and B merged with M' forked
beside them where the batch has two cores) only once it scores like the eager guard."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.engine import build_engine
from defense.timing import fastest_seconds, median_seconds
from defense.features import ActivationTap, find_feature_layers
from defense.grouped import merge_models
from defense.models import create_model
from test_engine import random_guard, samples


def three(arch: str, seed: int = 0) -> list[nn.Module]:
    guard = random_guard(arch, 32 if arch != "tiny_cnn" else 16, seed)
    return [guard.model, guard.backdoor_expert, guard.auxiliary_model]


def separately(models: list[nn.Module], inputs: torch.Tensor, taps: list[str]) -> tuple[torch.Tensor, ...]:
    tap = ActivationTap(models[0], taps)
    try:
        with torch.inference_mode():
            logits = [model(inputs) for model in models[:1]]
            activations = tap.take()
            logits += [model(inputs) for model in models[1:]]
    finally:
        tap.remove()
    return (*logits, *activations)


def test_the_merged_network_computes_each_models_logits_and_ms_activations():
    for arch, size in (("tiny_cnn", 16), ("cifar_resnet_compact", 32), ("cifar_lenet", 32), ("cifar_vgg11_bn_compact", 32)):
        inputs = torch.randn(3, 3, size, size)
        for models in (three(arch), three(arch)[:2]):  # M, B and M'; M and B (the engine's merged pair)
            taps = find_feature_layers(models[0], inputs)
            merged = merge_models(models, taps)
            assert merged is not None, arch
            with torch.inference_mode():
                got = merged(inputs)
            want = separately(models, inputs, taps)
            assert len(got) == len(models) + len(taps)
            for g, w in zip(got, want):
                assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5), arch
            assert not torch.allclose(got[0], got[1])  # different models, different outputs


class TwiceCalledRelu(nn.Module):
    """torchvision's BasicBlock reuses one ReLU module; a view(size(0), -1) flattens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        x = self.relu(x)
        x = self.relu(self.norm(self.conv(x)))
        return self.head(x.view(x.size(0), -1))


class Concatenates(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(torch.cat([self.a(x), self.b(x)], 1), 1).flatten(1))


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.norm = nn.Linear(3 * 8 * 8, 4), nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.head(x.flatten(1)))


def test_a_module_called_twice_and_a_batch_view_merge():
    torch.manual_seed(0)
    models = [TwiceCalledRelu().eval() for _ in range(3)]
    inputs = torch.randn(2, 3, 8, 8)
    merged = merge_models(models)
    with torch.inference_mode():
        for got, model in zip(merged(inputs), models):
            assert torch.allclose(got, model(inputs), atol=1e-6)


def test_what_the_merge_does_not_rewrite_is_refused():
    assert merge_models([Concatenates().eval() for _ in range(3)]) is None
    assert merge_models([LayerNormed().eval() for _ in range(3)]) is None
    assert merge_models([create_model("tiny_cnn", 4).eval()]) is None  # one model: nothing to merge
    mixed = [create_model("tiny_cnn", 4).eval(), create_model("tiny_cnn", 4).eval(), LayerNormed().eval()]
    assert merge_models(mixed) is None
    assert merge_models(three("tiny_cnn"), ["no.such.layer"]) is None


def test_the_jit_engine_runs_small_batches_on_the_merged_network_and_scores_like_eager():
    guard = random_guard("cifar_resnet_compact", 32)
    fallbacks = []
    engine = build_engine(guard, "jit", samples(32), on_fallback=fallbacks.append, parallel_up_to=2, merged_up_to=2,
                          time_merged=False)
    assert engine.merged_up_to == 2 and engine.pair_up_to == 2 and not fallbacks
    assert engine._forwards_for(2) is engine._pair_forwards  # two cores: M and B merged, M' beside them
    assert engine._forwards_for(2, cores=1) is engine._merged_forwards  # one core: the three merged
    assert engine._forwards_for(3) is engine._forwards
    images = samples(32)[2]
    for batch in (images[:1], images[:2]):
        want = guard.score_batch(batch)
        for got in (engine(batch), engine(batch, cores=1)):
            assert torch.equal(got.label, want.label) and torch.allclose(got.score, want.score, rtol=1e-5, atol=0)
    unasked = build_engine(guard, "jit", samples(32))
    assert unasked.merged_up_to == 0 and unasked.pair_up_to == 0  # only when asked for
    alone = build_engine(guard, "jit", samples(32), merged_up_to=2, time_merged=False)
    assert alone.merged_up_to == 2 and alone.pair_up_to == 0  # the pair forks: only beside the parallel graph


def test_a_model_the_merge_refuses_keeps_the_other_graphs_and_says_why():
    from defense.guard import Guard
    from synthetic import PREPROCESSING

    torch.manual_seed(0)

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(F.adaptive_avg_pool2d(torch.cat([self.a(x), self.b(x)], 1), 1).flatten(1))

    guard = Guard(Small().eval(), Small().eval(), Small().eval(), preprocessing=PREPROCESSING, rejection_threshold=1.0)
    fallbacks = []
    engine = build_engine(guard, "jit", samples(16), on_fallback=fallbacks.append, merged_up_to=4, time_merged=False)
    assert engine.name == "jit" and engine.merged_up_to == 0 and engine.pair_up_to == 0
    assert len(fallbacks) == 1 and "merged network not used" in fallbacks[0]


def test_each_merged_network_is_kept_only_where_one_image_runs_no_slower_through_it(monkeypatch, caplog):
    import defense.engine

    guard = random_guard("tiny_cnn", 16)
    # seconds for one image: the three merged (one thread), the merged pair (two threads), the parallel graph
    for three_s, pair_s, other_s, three_kept, pair_kept in ((0.002, 0.003, 0.001, False, False),
                                                             (0.001, 0.002, 0.002, True, False),
                                                             (0.001, 0.001, 0.001, True, True),
                                                             (0.002, 0.001, 0.0015, False, True),
                                                             (0.001, 0.0005, 0.002, True, True)):
        timed = []

        def fastest(functions, images, seconds=(three_s, pair_s, other_s)):
            timed.append(len(functions))
            return list(seconds)

        monkeypatch.setattr(defense.engine, "fastest_seconds", fastest)
        fallbacks = []
        caplog.clear()
        with caplog.at_level("INFO", logger="badexpert.engine"):
            engine = build_engine(guard, "jit", samples(16), on_fallback=fallbacks.append, parallel_up_to=8,
                                  merged_up_to=1)
        assert timed == [3] and engine.parallel_up_to == 8 and not fallbacks
        assert engine.merged_up_to == (1 if three_kept else 0) and engine.pair_up_to == (1 if pair_kept else 0)
        said = f"merged network not used: one image took {1000 * three_s:.2f} ms against {1000 * other_s:.2f} ms"
        assert (said in caplog.text) != three_kept  # a choice, told at info level, not a fallback warning
        assert ("merged pair (M and B merged, M' beside them) not used" in caplog.text) != pair_kept


def test_merged_networks_are_timed_on_one_image_and_on_the_largest_batch_they_would_serve(monkeypatch):
    """Slower for the larger batch only: kept for one image."""
    import defense.engine

    guard = random_guard("tiny_cnn", 16)
    sizes = []

    def fastest(functions, images):  # three merged, pair, parallel graph: the pair fastest for 1, slowest for 4
        sizes.append((len(images), len(functions)))
        return [0.002, 0.001, 0.003] if len(images) == 1 else [0.008, 0.012, 0.010]

    monkeypatch.setattr(defense.engine, "fastest_seconds", fastest)
    engine = build_engine(guard, "jit", samples(16), parallel_up_to=8, merged_up_to=4)
    assert sizes == [(1, 3), (4, 3)] and engine.merged_up_to == 4 and engine.pair_up_to == 1  # it still serves one
    assert engine._forwards_for(1) is engine._pair_forwards and engine._forwards_for(2) is engine._merged_forwards
    sizes.clear()
    monkeypatch.setattr(defense.engine, "fastest_seconds", lambda functions, images: (
        sizes.append((len(images), len(functions))) or [0.003, 0.002, 0.001]))  # both slower for one image
    engine = build_engine(guard, "jit", samples(16), parallel_up_to=8, merged_up_to=4)
    assert sizes == [(1, 3)] and engine.merged_up_to == 0 and engine.pair_up_to == 0  # the batch of 4 is not timed


def test_timing_interleaves_the_functions_and_keeps_each_ones_fastest_call():
    order, delays = [], {"a": iter([0.0, 0.0, 0.03, 0.002, 0.03]), "b": iter([0.0, 0.0, 0.01, 0.03, 0.01])}

    def timed(name):
        def function(images):
            order.append(name)
            __import__("time").sleep(next(delays[name]))
        return function

    a, b = fastest_seconds([timed("a"), timed("b")], torch.zeros(1), calls=3, warmup=2)
    assert order == ["a", "b"] * 5  # in turn, two warm-up rounds first
    # the fastest measured call of each, whatever the slow ones: a 2 ms, b 10 ms (a sleep overshoots a little)
    assert 0.002 <= a < 0.009 and 0.01 <= b < 0.029, (a, b)

    calls = [0]

    def slow(images):
        calls[0] += 1
        __import__("time").sleep(0.002)

    assert 0.002 <= median_seconds(slow, torch.zeros(1), calls=3) < 0.05 and calls[0] == 5  # two warm-up calls
