"""Freed memory kept by the allocator or not (issue 30f, ``--retain-freed-mb``): the jit engine's
forwards timed as the server runs them, off the main thread, in two processes side by side, one
with glibc's own thresholds (``--retain-freed-mb 0``) and one with the server's default. Rounds
alternate the two; each prints ms per batch (median) and page faults per batch of the threads
that ran it.

    python -m bench.allocator                        # compact CIFAR ResNet, batches of 1, 8, 32, 64
    python -m bench.allocator --sizes 64 --rounds 3

The bundle is ``bench.serve``'s (random weights, the feature signal on); the engine is built as
the server builds it on two cores (merged network for one image, parallel graph up to 8, larger
batches in two slices of one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading

import torch

from bench.serve import MODELS, RETAIN_FREED_MB, bundle_for, sample_images


def measure(model: str, sizes: list[int], retain_mb: int) -> dict:
    """In this process: ms per batch and minor page faults per batch, each size run on a thread
    that is not the main one, as the server's inference thread is."""
    from defense.allocator import retain_freed_memory
    from defense.bundle import load_bundle
    from defense.engine import build_engine
    from defense.timing import median_seconds

    retain_freed_memory(retain_mb)
    setup = MODELS[model]
    guard, _ = load_bundle(bundle_for(model), "cpu")
    checks = [sample_images(setup, 2), sample_images(setup, 1), sample_images(setup, 5)]
    torch.set_num_threads(2)
    engine = build_engine(guard, "jit", checks, parallel_up_to=8, split_ways=2, sliced_over=8, merged_up_to=1)
    results = {}

    def run() -> None:
        torch.set_num_threads(1)
        for size in sizes:
            images = sample_images(setup, size)
            calls = max(10, 200 // size)
            engine(images)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = median_seconds(engine, images, calls, warmup=2)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (calls + 2)
            results[size] = {"ms": 1000 * seconds, "faults": faults}

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="compact", choices=sorted(MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median shown, range beside)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.model, args.sizes, args.child)))
        return 0
    settings = {"glibc's thresholds (0)": 0, f"kept (--retain-freed-mb {RETAIN_FREED_MB})": RETAIN_FREED_MB}
    runs = {name: [] for name in settings}
    for round_index in range(args.rounds):
        for name, megabytes in settings.items():
            print(f"round {round_index + 1} of {args.rounds}: {name}", file=sys.stderr)
            done = subprocess.run([sys.executable, "-m", "bench.allocator", "--model", args.model, "--sizes",
                                   *map(str, args.sizes), "--child", str(megabytes)],
                                  capture_output=True, text=True, check=True)
            runs[name].append({int(size): value for size, value in json.loads(done.stdout.splitlines()[-1]).items()})
    print(f"{args.model}, the jit engine as served on 2 threads, ms per batch (median of {args.rounds} rounds, range) "
          "and page faults per batch")
    print("| allocator | " + " | ".join(f"batch {size}" for size in args.sizes) + " |")
    print("|---|" + "---:|" * len(args.sizes))
    for name, rounds in runs.items():
        cells = []
        for size in args.sizes:
            times = [run[size]["ms"] for run in rounds]
            faults = statistics.median(run[size]["faults"] for run in rounds)
            cells.append(f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f}); {faults:,.0f} faults")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
