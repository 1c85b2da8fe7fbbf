"""The guard against the best bare engine on a CUDA device (issue 30's GPU check; prepared, NOT YET
RUN: no device was lent to the session that wrote it). In one process, on ``--device`` (default
cuda), interleaved rounds of: the bare model (normalizer + M) eager and TorchScript frozen and
optimized, and the guard's engines (eager, fused, jit, and eager with the three models on their
own CUDA streams, as ``badexpert serve`` runs eager on CUDA): batch-64 throughput and batch-1
median latency, uint8 images from the CPU each call (the server's copy in), synchronized.

    python -m bench.serve_gpu                   # compact CIFAR ResNet and mobilenet_v3_small, 3 rounds
    python -m bench.serve_gpu --models compact --rounds 5 --seconds 2

Prints one Markdown table (medians, range over rounds; ratios within each round to the bare
TorchScript model) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.bare_engines import bare_eager, bare_torchscript
from bench.serve import MODELS, bundle_for, sample_images
from defense.bundle import load_bundle
from defense.engine import ENGINES, build_engine


def _on_streams(guard, streams):
    """The eager guard with M, B and M' each on its own stream (what the server does on CUDA)."""
    @torch.inference_mode()
    def score(images_uint8):
        inputs = guard.normalizer(images_uint8.to(guard.device, non_blocking=True))
        current = torch.cuda.current_stream(guard.device)
        outputs = []
        for stream, model in zip(streams, (guard.model, guard.backdoor_expert, guard.auxiliary_model)):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                outputs.append(model(inputs))
        for stream in streams:
            current.wait_stream(stream)
        return guard.scores_from(*outputs, guard.activations())
    return score


def paths(name: str, device: str) -> list[tuple[str, object]]:
    guard, _ = load_bundle(bundle_for(name), device)
    setup = MODELS[name]
    example = sample_images(setup, 64).to(device)
    bare, script = bare_eager(guard), bare_torchscript(guard, example)
    found = [("bare eager", lambda images: bare(images.to(device, non_blocking=True))),
             ("bare TorchScript", lambda images: script(images.to(device, non_blocking=True)))]
    checks = [sample_images(setup, 2), sample_images(setup, 1), sample_images(setup, 5)]
    for engine_name in ENGINES:
        engine = build_engine(guard, engine_name, checks)
        if engine.name == engine_name:
            found.append((f"guard {engine_name}", engine))
    if torch.device(device).type == "cuda":
        found.append(("guard eager, 3 streams", _on_streams(guard, [torch.cuda.Stream(device) for _ in range(3)])))
    return found


def timed(function, images: torch.Tensor, seconds: float, device: str) -> float:
    """Median seconds of one synchronized call."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        function(images)
    synchronize()
    times, stop = [], time.perf_counter() + seconds
    while len(times) < 10 or time.perf_counter() < stop:
        started = time.perf_counter()
        function(images)
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["compact", "mobilenet_v3_small"], choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per path, batch size and round")
    args = parser.parse_args(argv)
    print(f"device {args.device}: {torch.cuda.get_device_name(args.device) if 'cuda' in args.device else 'cpu'}; "
          f"torch {torch.__version__}\n")
    print("| model | path | batch 64 img/s | vs bare TorchScript b64 | batch 1 ms | vs bare TorchScript b1 |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models:
        setup, found = MODELS[name], paths(name, args.device)
        batch, one = sample_images(setup, 64).pin_memory() if "cuda" in args.device else sample_images(setup, 64), \
            sample_images(setup, 1)
        rounds = []
        for _ in range(args.rounds):
            rounds.append({label: (64 / timed(function, batch, args.seconds, args.device),
                                   1000 * timed(function, one, args.seconds / 2, args.device))
                           for label, function in found})
        for label, _ in found:
            throughput = [measured[label][0] for measured in rounds]
            latency = [measured[label][1] for measured in rounds]
            to_script = [measured[label][0] / measured["bare TorchScript"][0] for measured in rounds]
            latency_ratio = [measured[label][1] / measured["bare TorchScript"][1] for measured in rounds]
            print(f"| {setup.arch} {setup.size}px | {label} | {spread(throughput, 0)} | {spread(to_script, 2)} | "
                  f"{spread(latency, 2)} | {spread(latency_ratio, 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
