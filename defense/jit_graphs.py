"""The jit engine's graphs: the modules that :func:`jit_forwards` traces into one TorchScript graph
each, uint8 images in, the columns of :class:`defense.score.GuardScores` out (the normalizer, the
three models, M's tapped activations and the score, in one graph).

- serial: M, B and M' one after the other (:class:`_ThreeForwards`);
- parallel: B in a ``torch.jit.fork`` task beside M and then M' (:class:`_ThreeForwardsInParallel`);
- merged ``"three"``: the three models as one merged network (:mod:`defense.grouped`);
- merged ``"pair"``: M and B as one merged network with M' forked beside them.

:mod:`defense.engine` chooses among them per batch and checks each against the eager guard.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from defense.grouped import merge_models
from defense.guard import Guard


class _ThreeForwards(nn.Module):
    """normalizer, then M, B and M' on the same input (and M's tapped activations): one module, so
    one trace."""

    def __init__(self, guard: Guard):
        super().__init__()
        self.normalizer, self.model = guard.normalizer, guard.model
        self.expert, self.auxiliary = guard.backdoor_expert, guard.auxiliary_model
        self._guard = [guard]  # not a submodule: its activations() reads the tap that M's forward fills

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = self.normalizer(images_uint8)
        model_logits = self.model(inputs)
        activations = self._guard[0].activations()
        return (model_logits, self.expert(inputs), self.auxiliary(inputs), *activations)


class _ThreeForwardsInParallel(_ThreeForwards):
    """The same three forwards with B in a ``torch.jit.fork`` task (torch's inter-op pool) while this
    thread runs M and then M': two threads busy rather than one, for batches too small to keep
    intra-op threads busy. B alone is forked so that two threads, not three, share two cores."""

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = self.normalizer(images_uint8)
        expert = torch.jit.fork(self.expert, inputs)
        model_logits = self.model(inputs)
        activations = self._guard[0].activations()  # read before M' runs: the tap is M's
        auxiliary_logits = self.auxiliary(inputs)
        return (model_logits, torch.jit.wait(expert), auxiliary_logits, *activations)


class _MergedForwards(nn.Module):
    """The same three forwards as one merged network (:func:`defense.grouped.merge_models`): every layer
    runs M, B and M' side by side as channel groups, M's tapped activations among its outputs."""

    def __init__(self, guard: Guard, merged: nn.Module):
        super().__init__()
        self.normalizer, self.merged = guard.normalizer, merged

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.merged(self.normalizer(images_uint8))


class _MergedPairForwards(nn.Module):
    """The same three forwards as two jobs of about one size on two threads: M and B merged into one
    network (two channel groups, M's tapped activations among its outputs) on the calling thread, and
    M' in a ``torch.jit.fork`` task beside it. For a lone image with two cores: the merged network of
    three on one thread does the work of fewer, wider layers but leaves the second core idle."""

    def __init__(self, guard: Guard, pair: nn.Module):
        super().__init__()
        self.normalizer, self.pair, self.auxiliary = guard.normalizer, pair, guard.auxiliary_model

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = self.normalizer(images_uint8)
        auxiliary = torch.jit.fork(self.auxiliary, inputs)
        model_logits, expert_logits, *activations = self.pair(inputs)
        return (model_logits, expert_logits, torch.jit.wait(auxiliary), *activations)


class _ScoredForwards(nn.Module):
    """``forwards`` (a :class:`_ThreeForwards`), then the guard's scores from its outputs, as the
    columns of :class:`GuardScores` in field order: the score's few dozen small tensor operations go
    into the same graph as the forwards rather than through Python one by one (compact CIFAR ResNet,
    batch 1, one torch thread: about 0.3 ms less per batch, ``python -m bench.parallel_forwards``)."""

    def __init__(self, forwards: _ThreeForwards, guard: Guard):
        super().__init__()
        self.forwards = forwards
        self._guard = [guard]  # not a submodule: its models are already forwards'

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model_logits, expert_logits, auxiliary_logits, *activations = self.forwards(images_uint8)
        scores = self._guard[0].scores_from(model_logits, expert_logits, auxiliary_logits, activations)
        return tuple(vars(scores).values())


MERGED_GRAPHS = ("three", "pair")  # jit_forwards' merged graphs: M, B and M' as one network; M and B, M' beside


def _scored_three(guard: Guard, parallel: bool = False, merged: str | None = None) -> _ScoredForwards:
    if merged is not None:
        layers = guard.feature_detector.layers if guard.feature_detector is not None else []
        models = [guard.model, guard.backdoor_expert] + ([guard.auxiliary_model] if merged == "three" else [])
        network = merge_models(models, layers)
        if network is None:
            raise ValueError("the models cannot be merged into one network (a layer defense.grouped does not "
                             "rewrite)")
        network = network.to(guard.device)
        forwards = _MergedForwards(guard, network) if merged == "three" else _MergedPairForwards(guard, network)
        return _ScoredForwards(forwards, guard).eval()
    return _ScoredForwards((_ThreeForwardsInParallel if parallel else _ThreeForwards)(guard), guard).eval()


def jit_forwards(guard: Guard, example: torch.Tensor, parallel: bool = False, scored: bool = True,
                 merged: str | None = None) -> Callable:
    """The jit graph: uint8 images in, the columns of :class:`GuardScores` out (``scored=False``: the
    logits and activations, without the score; ``bench.parallel_forwards`` compares the two).
    ``parallel``: B forked beside M and M'; ``merged``: ``"three"``, the three models as one merged
    network; ``"pair"``, M and B merged with M' forked beside them."""
    if merged is not None and merged not in MERGED_GRAPHS:
        raise ValueError(f"merged: {merged!r}, not one of {MERGED_GRAPHS}")
    module = _scored_three(guard, parallel, merged)
    module = module if scored else module.forwards
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings: the check below decides
        traced = torch.jit.trace(module, example.to(guard.device), check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
