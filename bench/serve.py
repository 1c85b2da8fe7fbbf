"""Serving speed (issue 18): the bare model, the guard in-process, and a real ``badexpert serve``
under HTTP load, in one run, as one Markdown table.

    python -m bench.serve                       # compact CIFAR ResNet (32x32) and mobilenet_v3_small (224x224)
    python -m bench.serve --quick               # smoke run: short scenarios, first model only
    python -m bench.serve --server-arg=--max-wait-ms=0 --server-arg=--torch-threads=1

Per model: a bundle with random weights (detection quality is irrelevant to speed), written once
under ``~/.cache/badexpert/bench/serve/``; then in-process timings (bare model: batch-64
throughput and batch-1 latency; guard: ``Guard.score_batch``), then a ``badexpert serve``
subprocess on loopback with its defaults (plus ``--device cpu`` and any ``--server-arg``), loaded
by client threads on keep-alive ``http.client`` connections, one scenario after another, each
bounded by a duration. Mean batch size comes from the server's ``badexpert_batch_size`` histogram.

Ratios: an HTTP row's throughput over the bare model's batch-64 throughput, its p50 over the bare
batch-1 forward; the batching gain is 64-client over 1-client throughput. Outputs:
``serve.json`` and ``serve.md`` in ``--out`` (default ``~/.cache/badexpert/bench/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.cifar10 import CACHE
from bench.load import batch_counts, get, json_body, multipart_body, png_bytes, run_load
from defense.bundle import load_bundle, save_bundle
from defense.engine import ENGINES, build_engine
from defense.feature_fit import fit_guard_features
from defense.guard import Guard
from defense.models import create_model
from defense.models.loading import ModelSpec
from defense.preprocessing import Preprocessing

BUNDLES = CACHE / "bench" / "serve"
RESULTS = CACHE / "bench" / "results"
NUM_CLASSES = 10


@dataclass(frozen=True)
class ModelSetup:
    arch: str
    size: int
    preset: str


MODELS = {
    "compact": ModelSetup("cifar_resnet_compact", 32, "cifar"),
    "mobilenet_v3_small": ModelSetup("mobilenet_v3_small", 224, "imagenet"),
    "resnet18": ModelSetup("resnet18", 224, "imagenet"),
    "tiny": ModelSetup("tiny_cnn", 16, "cifar"),  # the test's model
}
DEFAULT_MODELS = ("compact", "mobilenet_v3_small")


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    images_per_request: int
    body: str  # multipart or json


SCENARIOS = (
    Scenario("http 1 client x 1 image", 1, 1, "multipart"),
    Scenario("http 8 clients x 1 image", 8, 1, "multipart"),
    Scenario("http 64 clients x 1 image", 64, 1, "multipart"),
    Scenario("http 8 clients x 16 images", 8, 16, "multipart"),
    Scenario("http 8 clients x 1 image, JSON", 8, 1, "json"),
    Scenario("http 1 client x 1 image, JSON", 1, 1, "json"),
)


def bundle_for(name: str, signals: str = "fused") -> Path:
    """The bench bundle of a model setup (random weights, tau at the median of random images' scores);
    ``signals`` other than "expert": with the feature signal, fitted on random images (the layers and
    matrix sizes of a real build)."""
    setup = MODELS[name]
    path = BUNDLES / f"{setup.arch}_{setup.size}" if signals == "expert" else BUNDLES / f"{setup.arch}_{setup.size}_{signals}"
    if (path / "manifest.json").exists():
        return path
    torch.manual_seed(0)
    preprocessing = Preprocessing.from_dict({**Preprocessing.from_preset(setup.preset).to_dict(),
                                             "input_size": (setup.size, setup.size)})
    models = [create_model(setup.arch, NUM_CLASSES).eval() for _ in range(3)]
    guard = Guard(*models, preprocessing=preprocessing, rejection_threshold=1.0)
    if signals != "expert":
        reference = torch.randint(0, 256, (64, 3, setup.size, setup.size), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(2))
        fit_guard_features(guard, sample_images(setup, 128), reference, NUM_CLASSES, signals)
    scores = guard.score_batch(sample_images(setup, 32)).score
    guard.rejection_threshold = float(scores.median())
    fields = {"created_at": "2026-01-01T00:00:00+00:00", "class_names": [f"class_{i}" for i in range(NUM_CLASSES)],
              "num_classes": NUM_CLASSES, "target_fpr": 0.01, "threshold": {"tau": guard.rejection_threshold,
                                                                           "rule": "bench: random weights"},
              "calibration": {"n": 0, "k": 0}, "accuracy_on_selection": {}, "backdoor_expert": {},
              "auxiliary_model": {}, "settings": {"bench": "serve"}, "build_seconds": 0.0}
    save_bundle(path, guard, ModelSpec("registry", setup.arch, NUM_CLASSES), fields, overwrite=True)
    return path


def sample_images(setup: ModelSetup, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (count, 3, setup.size, setup.size), dtype=torch.uint8, generator=generator)


def _timed(function, duration_s: float, minimum: int = 3) -> list[float]:
    times, stop = [], time.perf_counter() + duration_s
    while len(times) < minimum or time.perf_counter() < stop:
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def in_process(bundle: Path, setup: ModelSetup, duration_s: float) -> dict:
    """Bare model (normalizer + M), the eager guard and the other engines, batch 64 and batch 1, in this process."""
    guard, _ = load_bundle(bundle, "cpu")
    batch, one = sample_images(setup, 64), sample_images(setup, 1)

    @torch.inference_mode()
    def bare(images):
        return guard.model(guard.normalizer(images))

    checks = [sample_images(setup, 2), sample_images(setup, 1), sample_images(setup, 5)]
    engines = {name: build_engine(guard, name, checks) for name in ENGINES if name != "eager"}
    for images in (batch, one):  # warm up
        bare(images)
        guard.score_batch(images)
        for engine in engines.values():
            engine(images)
    results = {}
    paths = [("bare", bare), ("guard", guard.score_batch)]
    paths += [(f"guard_{name}", engine) for name, engine in engines.items() if engine.name == name]
    for name, function in paths:
        big = _median(_timed(lambda: function(batch), duration_s))
        small = _median(_timed(lambda: function(one), duration_s / 2, minimum=10))
        results[name] = {"batch64_images_per_s": 64 / big, "batch1_ms": 1000 * small}
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def badexpert_command() -> list[str]:
    """This checkout's command: an installed ``badexpert`` script may run another checkout's code
    (an editable install made elsewhere). tests/test_layout.py checks the script's entry point."""
    return [sys.executable, "-m", "badexpert"]


def start_server(bundle: Path, port: int, server_args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    process = subprocess.Popen(badexpert_command() + ["serve", str(bundle), "--port", str(port), "--device", "cpu",
                                                      *server_args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if get("127.0.0.1", port, "/readyz", 2)[0] == 200:
                return process
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not become ready: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)


def http_scenarios(port: int, setup: ModelSetup, duration_s: float, scenarios=SCENARIOS) -> list[dict]:
    images = [png_bytes(image) for image in sample_images(setup, 16)]
    rows = []
    for scenario in scenarios:
        blobs = images[:scenario.images_per_request]
        body, content_type = (multipart_body if scenario.body == "multipart" else json_body)(blobs)
        run_load("127.0.0.1", port, body, content_type, scenario.images_per_request, scenario.clients,
                 min(0.5, duration_s / 4))  # warm the connections and the server's path
        images_before, forwards_before = batch_counts("127.0.0.1", port)
        result = run_load("127.0.0.1", port, body, content_type, scenario.images_per_request, scenario.clients,
                          duration_s)
        images_after, forwards_after = batch_counts("127.0.0.1", port)
        forwards = forwards_after - forwards_before
        rows.append({"scenario": scenario.name, "clients": scenario.clients,
                     "images_per_request": scenario.images_per_request, "body": scenario.body, **result.summary(),
                     "mean_batch": round((images_after - images_before) / forwards, 2) if forwards else None})
    return rows


def bench_model(name: str, duration_s: float, server_args: list[str], out: Path, log=print,
                signals: str = "fused") -> dict:
    setup = MODELS[name]
    bundle = bundle_for(name, signals)
    log(f"{name}: in-process timings")
    local = in_process(bundle, setup, duration_s)
    port = free_port()
    log(f"{name}: starting badexpert serve on port {port} {' '.join(server_args)}")
    process = start_server(bundle, port, server_args, out / f"serve-{name}.log")
    try:
        info = json.loads(get("127.0.0.1", port, "/v1/info")[1])
        rows = []
        for scenario in SCENARIOS:
            log(f"{name}: {scenario.name}")
            rows += http_scenarios(port, setup, duration_s, [scenario])
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return {"model": name, "arch": setup.arch, "input_size": setup.size, "in_process": local, "http": rows,
            "batching": info.get("batching"), "server_args": server_args}


def table(results: list[dict]) -> str:
    lines = ["| model | path | img/s | vs bare b64 | p50 ms | p99 ms | p50 / bare b1 | mean batch | statuses |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for result in results:
        bare, guard = result["in_process"]["bare"], result["in_process"]["guard"]
        reference, single = bare["batch64_images_per_s"], bare["batch1_ms"]
        model = f"{result['arch']} {result['input_size']}px"
        lines.append(f"| {model} | bare model in-process, batch 64 | {reference:,.0f} | 1.00 | | | | 64 | |")
        lines.append(f"| {model} | bare model in-process, batch 1 | {1000 / single:,.0f} | {1000 / single / reference:.2f} "
                     f"| {single:.2f} | | 1.0 | 1 | |")
        lines.append(f"| {model} | guard in-process, batch 64 | {guard['batch64_images_per_s']:,.0f} | "
                     f"{guard['batch64_images_per_s'] / reference:.2f} | | | | 64 | |")
        lines.append(f"| {model} | guard in-process, batch 1 | {1000 / guard['batch1_ms']:,.0f} | "
                     f"{1000 / guard['batch1_ms'] / reference:.2f} | {guard['batch1_ms']:.2f} | | "
                     f"{guard['batch1_ms'] / single:.1f} | 1 | |")
        for engine in ENGINES:
            timing = result["in_process"].get(f"guard_{engine}")
            if timing is not None:
                lines.append(f"| {model} | guard in-process, {engine} engine, batch 64 / batch 1 | "
                             f"{timing['batch64_images_per_s']:,.0f} | {timing['batch64_images_per_s'] / reference:.2f} | "
                             f"{timing['batch1_ms']:.2f} | | {timing['batch1_ms'] / single:.1f} | 64 / 1 | |")
        for row in result["http"]:
            statuses = ", ".join(f"{code}: {count}" for code, count in sorted(row["statuses"].items()))
            lines.append(f"| {model} | {row['scenario']} | {row['images_per_s']:,.0f} | "
                         f"{row['images_per_s'] / reference:.3f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                         f"{row['p50_ms'] / single:.1f} | {row['mean_batch'] or 0:.1f} | {statuses} |")
        by_name = {row["scenario"]: row for row in result["http"]}
        one, many = by_name.get(SCENARIOS[0].name), by_name.get(SCENARIOS[2].name)
        if one and many and one["images_per_s"]:
            result["batching_gain_64_vs_1"] = many["images_per_s"] / one["images_per_s"]
            lines.append(f"| {model} | batching gain (64 clients / 1 client) | {result['batching_gain_64_vs_1']:.2f}x "
                         "| | | | | | |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--duration", type=float, help="seconds per scenario (default 6; 0.6 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.6 s per scenario, the first model only")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra 'badexpert serve' argument")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for serve.json and serve.md")
    parser.add_argument("--signals", default="fused", choices=["expert", "fused"],
                        help="the bundle's signals: fused (the build's default) or the expert's score alone")
    args = parser.parse_args(argv)
    models = args.models or (DEFAULT_MODELS[:1] if args.quick else DEFAULT_MODELS)
    duration = args.duration or (0.6 if args.quick else 6.0)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = [bench_model(name, duration, args.server_arg, args.out, log=lambda text: print(text, flush=True),
                           signals=args.signals) for name in models]
    markdown = table(results)
    summary = {"machine": machine(), "duration_s": duration, "signals": args.signals, "seconds": round(time.monotonic() - started, 1),
               "results": results}
    (args.out / "serve.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "serve.md").write_text(markdown)
    print(markdown)
    print(f"results: {args.out / 'serve.json'} and {args.out / 'serve.md'} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
