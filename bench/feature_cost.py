"""What the feature signal costs in serving: in-process guard throughput with and without it, on
the same three models and the same engine, measured side by side (interleaved runs, medians).

    python -m bench.feature_cost                      # compact ResNet at 32x32, mobilenet_v3_small at 224x224
    python -m bench.feature_cost --engine eager --runs 5

Throughput does not depend on the weights' values, so the models are randomly initialized and the
feature statistics fitted on random images (the same layers and matrix sizes a real build gives).
Each run times ``--batches`` batches of ``--batch-size`` images through the engine; the two
configurations alternate run by run so that the machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

from defense.engine import build_engine
from defense.feature_fit import fit_guard_features
from defense.guard import Guard
from defense.models import create_model
from defense.preprocessing import Preprocessing

MODELS = {"cifar_resnet_compact": 32, "mobilenet_v3_small": 224}


def make_model(name: str) -> torch.nn.Module:
    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)(num_classes=10).eval()
    return create_model(name, num_classes=10).eval()


def guards(name: str, size: int) -> tuple[Guard, Guard, list[str]]:
    """(without, with) the feature signal: copies of the same three models (the hooks sit on the second's)."""
    torch.manual_seed(0)
    models = [make_model(name) for _ in range(3)]
    preprocessing = Preprocessing(input_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    plain = Guard(*models, preprocessing=preprocessing, rejection_threshold=1.0)
    tapped = Guard(*(copy.deepcopy(model) for model in models), preprocessing=preprocessing, rejection_threshold=1.0)
    images = torch.randint(0, 256, (192, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    detector = fit_guard_features(tapped, images[:128], images[128:], 10, "fused")
    return plain, tapped, detector.layers


def time_engine(engine, batch: torch.Tensor, batches: int) -> float:
    """Images per second over ``batches`` calls (after one warm-up call)."""
    engine(batch)
    started = time.perf_counter()
    for _ in range(batches):
        engine(batch)
    return batches * len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--engine", default="jit", choices=["eager", "fused", "jit"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, engine {args.engine}, "
          f"batch {args.batch_size}, {args.runs} interleaved runs of {args.batches} batches")
    print("| model | input | feature layers | without (img/s) | with (img/s) | with / without (median of per-run ratios) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        size = MODELS[name]
        plain, tapped, layers = guards(name, size)
        batch = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8)
        engines = [build_engine(guard, args.engine, [batch[:2], batch[:1], batch[:5]]) for guard in (plain, tapped)]
        if any(engine.name != args.engine for engine in engines):
            raise SystemExit(f"{name}: the {args.engine} engine fell back to {[e.name for e in engines]}")
        without, with_features = [], []
        for _ in range(args.runs):
            without.append(time_engine(engines[0], batch, args.batches))
            with_features.append(time_engine(engines[1], batch, args.batches))
        ratios = [w / o for w, o in zip(with_features, without)]
        print(f"| {name} | {size}x{size} | {len(layers)} | {statistics.median(without):.0f} "
              f"({min(without):.0f}-{max(without):.0f}) | {statistics.median(with_features):.0f} "
              f"({min(with_features):.0f}-{max(with_features):.0f}) | {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}) |")


if __name__ == "__main__":
    main()
