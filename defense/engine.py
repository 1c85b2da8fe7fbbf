"""Engines that run the guard's three forwards (M, B and M' on the same normalized batch) as one
unit of work, for serving. Each returns exactly what :meth:`Guard.score_batch` returns.

- ``eager``: :meth:`Guard.score_batch` itself, module by module.
- ``fused``: eager copies of the three models with each BatchNorm folded into the convolution
  before it (``torch.fx``) and channels-last weights; falls back to ``eager`` for a model that
  ``torch.fx`` cannot trace.
- ``jit``: the normalizer, the three models and the score traced into one TorchScript graph,
  frozen and optimized for inference (BatchNorm folded, oneDNN convolutions on CPU). Fewest Python
  calls per batch: on a small model at batch 1 it is about twice as fast as ``eager``. With ``parallel_up_to``
  (the server's small batches, which run on one torch thread), a second graph serves batches up to
  that size: B runs in a ``torch.jit.fork`` task on torch's inter-op pool while the calling thread
  runs M, then M'. Three forwards of one image then take about two forwards' time on two cores
  (compact CIFAR ResNet, batch 1, one torch thread: 2.45 against 3.47 ms, ``python -m
  bench.parallel_forwards``) instead of three. With ``split_ways`` (the server's large batches on
  CPU), a larger batch is cut into that many slices, each run through the serial graph on its own
  thread with one torch thread, instead of one forward on that many OpenMP threads: the slices never
  wait for each other inside a layer, so a core taken for a while by the server's event loop slows
  one slice rather than stalling the whole team at every layer (compact CIFAR ResNet, batch 64, two
  cores, in process: 59 against 73 ms on two OpenMP threads, ``python -m bench.parallel_forwards``).
  With ``merged_up_to`` (the server's small batches), merged networks (:mod:`defense.grouped`: each
  layer's weights side by side as channel groups) serve batches up to that size: where the batch
  has two cores, M and B merged on the calling thread with M' forked beside them (two jobs of
  about one size; one image 1.78 ms against the parallel graph's 2.38), and on one core the three
  merged, one forward of wider layers (2.24 ms against 3.27 for the serial graph on one thread);
  each kept where timing one image and a batch of ``merged_up_to`` at load finds it no slower (a
  large model loses with grouped convolutions). The graphs themselves are in
  :mod:`defense.jit_graphs`.

With the feature signal on (``guard.feature_detector``), M's hooked activations come out of the
same pass: ``jit`` traces them into its graph; ``fused`` keeps M eager (folding would remove the
modules the hooks sit on) and fuses B and M'.

A non-eager engine is checked when it is built: on sample batches of two sizes its scores must
match the eager guard's (``rtol`` 1e-5 on the score, identical labels and decisions), or the
engine falls back to ``eager`` and says why. A model that traces with a batch size baked in, or
with data-dependent control flow, is caught here.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal, TypeVar

import torch

from defense.fused_forwards import fused_forwards
from defense.guard import Guard
from defense.jit_graphs import jit_forwards
from defense.score import GuardScores, rejects
from defense.sliced_forwards import SlicedForwards
from defense.timing import fastest_seconds

EngineName = Literal["eager", "fused", "jit"]
ENGINES: tuple[str, ...] = ("eager", "fused", "jit")
SCORE_RTOL = 1e-5
log = logging.getLogger("badexpert.engine")
T = TypeVar("T")


class GuardEngine:
    """``engine(images_uint8)`` -> :class:`GuardScores` on the CPU, like ``guard.score_batch``.
    ``forwards``: uint8 images -> the three models' logits and M's tapped activations (``fused``), or
    the columns of :class:`GuardScores` (``jit``, whose graphs hold the score too).
    ``small_forwards``: another graph of the same forwards for batches of up to ``parallel_up_to``
    images (the jit engine's parallel one; 0: none). ``sliced``: the serial graph on slices of a
    larger batch, for batches of more than ``sliced_over`` and at least ``sliced.ways`` images
    (``split_ways``; 1: none). ``merged_forwards``: the merged network's graph, for batches of up to
    ``merged_up_to`` images (0: none; it comes first). ``pair_forwards``: M and B merged with M' forked
    beside them, for batches of up to ``pair_up_to`` images that have two cores (before all others)."""

    def __init__(self, name: str, guard: Guard, forwards: Callable[[torch.Tensor], tuple] | None = None,
                 channels_last: bool = False, small_forwards: Callable[[torch.Tensor], tuple] | None = None,
                 parallel_up_to: int = 0, sliced: SlicedForwards | None = None, sliced_over: int = 0,
                 merged_forwards: Callable[[torch.Tensor], tuple] | None = None, merged_up_to: int = 0,
                 pair_forwards: Callable[[torch.Tensor], tuple] | None = None, pair_up_to: int = 0):
        self.name, self.guard, self._forwards, self._channels_last = name, guard, forwards, channels_last
        self._small_forwards, self.parallel_up_to = small_forwards, parallel_up_to if small_forwards else 0
        self._sliced, self.sliced_over = sliced, sliced_over
        self.split_ways = sliced.ways if sliced else 1
        self._merged_forwards, self.merged_up_to = merged_forwards, merged_up_to if merged_forwards else 0
        self._pair_forwards, self.pair_up_to = pair_forwards, pair_up_to if pair_forwards else 0

    def large_batch_threads(self, threads: int) -> int:
        """The calling thread's torch threads for a batch it cuts into slices (one: each slice runs on its
        own thread), else ``threads``."""
        return 1 if self.split_ways > 1 else threads

    def threads_for(self, size: int, small: int, large: int, small_batch_size: int, cores: int | None = None) -> int:
        """The calling thread's torch threads for a batch of ``size`` images: ``small`` up to
        ``small_batch_size`` images (the merged network and the parallel graph run there), else
        ``large``, or one for a batch cut into slices (:meth:`large_batch_threads`); at most ``cores``
        where the batch has that many (concurrent batches) and runs beside others (:attr:`thread_safe`).
        The merged network on two OpenMP threads was faster in process and slower through HTTP
        (compact CIFAR ResNet, one client, two cores: median 4.2 against 3.4 ms on one thread): the
        team's second thread spins on the core the event loop needs."""
        threads = small if size <= small_batch_size else self.large_batch_threads(large)
        return threads if cores is None or not self.thread_safe else min(threads, cores)

    def with_parts(self, **parts) -> "GuardEngine":
        """A copy of this engine with some of its graphs replaced (the keyword arguments of ``__init__``)."""
        current = {"forwards": self._forwards, "channels_last": self._channels_last,
                   "small_forwards": self._small_forwards, "parallel_up_to": self.parallel_up_to,
                   "sliced": self._sliced, "sliced_over": self.sliced_over,
                   "merged_forwards": self._merged_forwards, "merged_up_to": self.merged_up_to,
                   "pair_forwards": self._pair_forwards, "pair_up_to": self.pair_up_to}
        return GuardEngine(self.name, self.guard, **{**current, **parts})

    @property
    def thread_safe(self) -> bool:
        """Whether two threads may run batches through this engine at once: the jit engine's frozen
        graphs may; the eager guard (and the fused engine's eager M) keeps one batch's activations in
        its tap."""
        return self.name == "jit"

    def _forwards_for(self, size: int, cores: int | None = None) -> Callable[[torch.Tensor], tuple]:
        two_cores = cores is None or cores > 1
        if size <= self.pair_up_to and two_cores:
            return self._pair_forwards
        if size <= self.merged_up_to:
            return self._merged_forwards
        if size <= self.parallel_up_to and two_cores:
            return self._small_forwards
        ways = self.split_ways if cores is None else min(cores, self.split_ways)
        if size > self.sliced_over and size >= ways > 1:
            return lambda images: self._sliced(images, ways)
        return self._forwards

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor, cores: int | None = None) -> GuardScores:
        """The scores of ``images_uint8``. ``cores``: how many cores this batch may take (the server's
        concurrent batches give each batch one, and a lone request every free one); None: all the
        engine was built for. On one, neither the merged pair, the parallel graph nor slices run."""
        if self._forwards is None:
            return self.guard.score_batch(images_uint8)
        images = images_uint8.to(self.guard.device, non_blocking=True)
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        outputs = self._forwards_for(len(images), cores)(images)
        if self.name == "jit":  # its graphs score too
            return GuardScores(*outputs)
        model_logits, expert_logits, auxiliary_logits, *activations = outputs
        return self.guard.scores_from(model_logits, expert_logits, auxiliary_logits, activations)


def mismatch(engine: GuardEngine, guard: Guard, samples: list[torch.Tensor]) -> str | None:
    """Why ``engine`` does not score like the eager guard on ``samples``, or None when it does."""
    for images in samples:
        expected, got = guard.score_batch(images), engine(images)
        if not torch.equal(expected.label, got.label):
            return f"labels differ at batch size {len(images)}"
        if not torch.allclose(got.score, expected.score, rtol=SCORE_RTOL, atol=1e-12, equal_nan=True):
            worst = ((got.score - expected.score).abs() / expected.score.abs().clamp_min(1e-300)).max()
            return f"scores differ by up to {float(worst):.2g} (relative) at batch size {len(images)}"
        tau = guard.rejection_threshold
        if not torch.equal(rejects(got.score, tau), rejects(expected.score, tau)):
            return f"decisions differ at batch size {len(images)}"
    return None


def _problem(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _one_torch_thread(build: Callable[[], T]) -> T:
    """``build()`` on one torch thread. Why: tracing or running the parallel graph can start torch's
    inter-op pool, and a pool worker takes the process's torch thread count when it starts and keeps
    it (OpenMP's setting is per thread). Started under two threads (the server loads under its
    large-batch count), the worker ran B on two OpenMP threads beside the calling thread, and the
    OpenMP threads left spinning slowed every later two-thread forward of the process about
    threefold (compact ResNet, 2 cores: a bare batch-1 forward 0.9 -> 3.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build()
    finally:
        torch.set_num_threads(threads)


def _with_checked(engine: GuardEngine, graph: str, otherwise: str, build: Callable, on_fallback: Callable) -> GuardEngine:
    """``engine.with_parts(**parts)`` for ``build()`` -> ``(parts, problem)``; ``engine`` unchanged where
    there are no parts, or a problem or an error (``on_fallback`` told why, and ``otherwise``)."""
    try:
        parts, problem = build()
    except Exception as error:
        parts, problem = None, _problem(error)
    if problem is not None:
        on_fallback(f"jit engine's {graph} not used ({problem}); {otherwise}")
        return engine
    return engine.with_parts(**parts) if parts else engine


def _with_parallel_graph(engine: GuardEngine, guard: Guard, samples: list[torch.Tensor], parallel_up_to: int,
                         on_fallback: Callable[[str], None]) -> GuardEngine:
    """``engine`` (jit, checked) with the parallel graph for batches up to ``parallel_up_to`` images, once
    that graph scores ``samples`` as eager does; ``engine`` unchanged (and ``on_fallback`` told) otherwise."""
    def build():
        parallel = _one_torch_thread(lambda: GuardEngine("jit", guard, jit_forwards(guard, samples[0], parallel=True)))
        problem = _one_torch_thread(lambda: mismatch(parallel, guard, samples))
        return {"small_forwards": parallel._forwards, "parallel_up_to": parallel_up_to}, problem
    return _with_checked(engine, "parallel graph", "small batches run the serial graph", build, on_fallback)


def _with_sliced_batches(engine: GuardEngine, guard: Guard, samples: list[torch.Tensor], ways: int, over: int,
                         on_fallback: Callable[[str], None]) -> GuardEngine:
    """``engine`` (jit, checked) running batches of more than ``over`` images as ``ways`` slices on as many
    threads, once that scores ``samples`` as eager does; ``engine`` unchanged (``on_fallback`` told) otherwise."""
    def build():
        sliced = SlicedForwards(engine._forwards, ways)
        problem = _one_torch_thread(lambda: mismatch(GuardEngine("jit", guard, engine._forwards, sliced=sliced),
                                                     guard, samples + [torch.cat(samples)]))
        return {"sliced": sliced, "sliced_over": over}, problem
    return _with_checked(engine, "sliced batches", "large batches run on one OpenMP team", build, on_fallback)


def _with_merged_network(engine: GuardEngine, guard: Guard, samples: list[torch.Tensor], merged_up_to: int,
                         on_fallback: Callable[[str], None], timed: bool = True) -> GuardEngine:
    """``engine`` (jit, checked) running batches of up to ``merged_up_to`` images through merged networks
    (:mod:`defense.grouped`), each once it scores ``samples`` as eager does and, with ``timed``, where a
    batch of one image and one of ``merged_up_to`` go through it at least as fast as through the graphs
    it would replace (each one's fastest call, called in turn: :func:`defense.timing.fastest_seconds`):

    - the three models merged, on one torch thread, where it is no slower than the graph that would run
      the batch otherwise (the parallel graph, else the serial one): a small model gains (fewer, wider
      operations), a large one loses the second core;
    - M and B merged with M' forked beside them (two threads; for a batch that has two cores), where it
      is no slower than both, and only beside the parallel graph (which forks too; it has the conditions
      for a second thread: one torch thread for small batches and two cores).

    Otherwise ``engine`` unchanged (a slower merged network is logged at info level, a mismatch or an
    error told to ``on_fallback``)."""
    def build():
        checked = [images[:merged_up_to] for images in samples]
        three = GuardEngine("jit", guard, jit_forwards(guard, samples[0], merged="three"))
        problem = mismatch(three, guard, checked)
        if problem is not None:
            return None, problem
        parts = {"merged_forwards": three._forwards, "merged_up_to": merged_up_to}
        candidates = {"merged": three._forwards}  # name in parts -> its graph
        if engine.parallel_up_to > 0:
            pair = _one_torch_thread(lambda: GuardEngine("jit", guard, jit_forwards(guard, samples[0], merged="pair")))
            problem = _one_torch_thread(lambda: mismatch(pair, guard, checked))
            if problem is not None:
                return None, f"the merged pair: {problem}"
            parts.update(pair_forwards=pair._forwards, pair_up_to=merged_up_to)
            candidates["pair"] = pair._forwards
        if timed:
            images = torch.cat(samples)
            while len(images) < merged_up_to:
                images = torch.cat([images, images])
            for size in sorted({1, merged_up_to}):  # a graph slower for the larger batch still serves one image
                graphs = {name: graph for name, graph in candidates.items() if f"{name}_up_to" in parts}  # still kept
                if not graphs:
                    break
                batch = images[:size]
                seconds = _one_torch_thread(lambda: fastest_seconds([*graphs.values(), engine._forwards_for(size)],
                                                                    batch))
                timed_s, other_s = dict(zip(graphs, seconds)), seconds[-1]
                if timed_s.get("merged", 0.0) > other_s:  # a choice, not a fault: said at info level
                    _narrow(parts, "merged", size, "merged network", timed_s["merged"], other_s)
                without = min(timed_s.get("merged", other_s), other_s)
                if timed_s.get("pair", 0.0) > without:
                    _narrow(parts, "pair", size, "merged pair (M and B merged, M' beside them)", timed_s["pair"],
                            without)
        return parts, None
    return _with_checked(engine, "merged network", "small batches run the other graphs", build, on_fallback)


def _narrow(parts: dict, graph: str, size: int, what: str, seconds: float, without: float) -> None:
    """A merged graph found slower for a batch of ``size`` images: used up to one image where it was no
    slower for one (``size`` above one), else not at all (logged at info level)."""
    if size > 1:
        parts[f"{graph}_up_to"] = 1
        log.info("jit engine's %s serves one image only: %d images took %.2f ms against %.2f ms without it", what,
                 size, 1000 * seconds, 1000 * without)
    else:
        del parts[f"{graph}_forwards"], parts[f"{graph}_up_to"]
        log.info("jit engine's %s not used: one image took %.2f ms against %.2f ms without it", what, 1000 * seconds,
                 1000 * without)


def build_engine(guard: Guard, name: str, samples: list[torch.Tensor],
                 on_fallback: Callable[[str], None] | None = None, parallel_up_to: int = 0,
                 split_ways: int = 1, sliced_over: int = 0, merged_up_to: int = 0,
                 time_merged: bool = True) -> GuardEngine:
    """The engine ``name`` for ``guard``, checked on ``samples`` (uint8 batches; give two sizes);
    ``eager`` when it cannot be built or does not match (``on_fallback`` hears why). ``parallel_up_to``:
    the jit engine runs batches of up to this many images on its parallel graph; ``split_ways``: it
    runs batches of more than ``sliced_over`` images (and at least ``split_ways``) as that many slices
    on as many threads, each with one torch thread; ``merged_up_to``: it runs batches of up to this
    many images through the three models merged into one network (:mod:`defense.grouped`), where
    (``time_merged``) one image runs through it no slower than without it. Each is checked like the
    engine itself, and dropped alone on a mismatch."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    eager = GuardEngine("eager", guard)
    if name == "eager":
        return eager
    try:
        if name == "jit":
            engine = GuardEngine("jit", guard, jit_forwards(guard, samples[0]))
        else:
            engine = GuardEngine("fused", guard, fused_forwards(guard), channels_last=True)
        problem = mismatch(engine, guard, samples)
    except Exception as error:  # untraceable model: eager serves it
        problem = _problem(error)
    if problem is None:
        if name == "jit" and split_ways > 1:
            engine = _with_sliced_batches(engine, guard, samples, split_ways, sliced_over, on_fallback or log.warning)
        if name == "jit" and parallel_up_to > 0:
            engine = _with_parallel_graph(engine, guard, samples, parallel_up_to, on_fallback or log.warning)
        if name == "jit" and merged_up_to > 0:
            engine = _with_merged_network(engine, guard, samples, merged_up_to, on_fallback or log.warning,
                                          time_merged)
        return engine
    message = f"engine {name} not used ({problem}); serving with the eager engine"
    (on_fallback or log.warning)(message)
    return eager
