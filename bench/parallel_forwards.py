"""The jit engine's graphs side by side in process (issues 30b, 30e): the three forwards of a small
batch serially on one torch thread, serially on two, on the parallel graph (B forked beside M and
M') on one thread, and as one merged network (:mod:`defense.grouped`) on one and on two threads.
Each graph holds the score too (the engine's graphs do); a last row times the graph's forwards
with the score computed in Python, as the engine did before issue 30d. Medians of many calls, the
rows interleaved per repetition.

    python -m bench.parallel_forwards                  # compact CIFAR ResNet, batches of 1 and 8
    python -m bench.parallel_forwards --sizes 1 8 64 --repeats 3

First it builds the engine as the server does and says whether the merged network is kept (it is
where one image runs no slower through it, timed at load). A last row cuts the batch in two
slices, each through the serial graph on its own thread with one torch thread (the server's large
batches, ``--slice-batches``).

The bundle is ``bench.serve``'s (random weights, the feature signal on). The parallel graph is
built first, on one torch thread (as the engine builds it), so that torch's inter-op pool starts
with one; the two-thread rows run in the same process after it.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch

from bench.serve import MODELS, RETAIN_FREED_MB, bundle_for, sample_images
from defense.allocator import retain_freed_memory
from defense.bundle import load_bundle
from defense.engine import build_engine
from defense.jit_graphs import jit_forwards
from defense.timing import median_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="compact", choices=sorted(MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (median shown, range beside)")
    args = parser.parse_args(argv)
    setup = MODELS[args.model]
    retain_freed_memory(RETAIN_FREED_MB)  # as the server sets its allocator
    guard, _ = load_bundle(bundle_for(args.model), "cpu")
    checks = [sample_images(setup, 2), sample_images(setup, 1), sample_images(setup, 5)]
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the engine's load-time choices
    started = time.perf_counter()
    served = build_engine(guard, "jit", checks, parallel_up_to=8, split_ways=2, sliced_over=8, merged_up_to=1)
    print(f"as the server builds it ({time.perf_counter() - started:.1f} s): for one image, merged network "
          f"{'kept' if served.merged_up_to else 'not used'}, merged pair {'kept' if served.pair_up_to else 'not used'}")
    engine = build_engine(guard, "jit", checks, parallel_up_to=max(args.sizes), split_ways=2,
                          merged_up_to=max(args.sizes), time_merged=False)  # every graph, to time them all
    if not engine.parallel_up_to or engine.split_ways != 2 or not engine.merged_up_to or not engine.pair_up_to:
        print("the parallel graph, the merged networks or the sliced batches were not built (see the log)")
        return 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine builds its parallel graph: torch's inter-op pool keeps one thread
    unscored = jit_forwards(guard, checks[0], parallel=True, scored=False)
    torch.set_num_threads(threads)

    def score_in_python(images: torch.Tensor):
        model_logits, expert_logits, auxiliary_logits, *activations = unscored(images)
        return guard.scores_from(model_logits, expert_logits, auxiliary_logits, activations)

    paths = (("serial graph, 1 thread", engine._forwards, 1), ("serial graph, 2 threads", engine._forwards, 2),
             ("parallel graph (B forked), 1 thread", engine._small_forwards, 1),
             ("merged network (M, B, M' as channel groups), 1 thread", engine._merged_forwards, 1),
             ("merged network, 2 threads", engine._merged_forwards, 2),
             ("merged pair (M and B merged, M' forked beside them), 1 thread each", engine._pair_forwards, 1),
             ("serial graph on 2 slices, 2 threads of 1 torch thread", engine._sliced, 1),
             ("parallel graph without the score, scored in Python (before issue 30d), 1 thread", score_in_python, 1))
    print(f"{args.model}, the three forwards and the score, ms (median of {args.repeats} repetitions, range)")
    print("| path | " + " | ".join(f"batch {size}" for size in args.sizes) + " |")
    print("|---|" + "---:|" * len(args.sizes))
    results = {name: {size: [] for size in args.sizes} for name, _, _ in paths}
    for _ in range(args.repeats):
        for size in args.sizes:
            images = sample_images(setup, size)
            for name, forwards, count in paths:
                torch.set_num_threads(count)
                results[name][size].append(1000 * median_seconds(forwards, images, max(20, 400 // size), warmup=5))
    torch.set_num_threads(threads)
    for name, by_size in results.items():
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in by_size.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
