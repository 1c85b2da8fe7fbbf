"""Serving speed (issues 18 and 30): the bare model (eager, and TorchScript frozen and optimized:
the best bare engine on CPU), the guard in-process, and a real ``badexpert serve`` under HTTP
load, in three interleaved rounds, as one Markdown table of medians and ranges.

    python -m bench.serve                       # compact CIFAR ResNet (32x32) and mobilenet_v3_small (224x224)
    python -m bench.serve --quick               # smoke run: short scenarios, first model only, one round
    python -m bench.serve --models compact --before /path/to/old/checkout   # before/after, interleaved
    python -m bench.serve --server-arg=--max-wait-ms=0 --server-arg=--torch-threads=1
    python -m bench.serve --models compact --before /path/to/old/checkout --before-server-arg=--event-loop=asyncio

Per model: a bundle with random weights (detection quality is irrelevant to speed), written once
under ``~/.cache/badexpert/bench/serve/``; a ``badexpert serve`` subprocess on loopback with its
defaults (plus ``--device cpu`` and any ``--server-arg``) and, with ``--before``, a second one run
from another checkout (plus any ``--before-server-arg``: the checkouts share this Python
environment, so a dependency added since, uvloop for one, needs the before server told not to use
it). Each round times, in this process, the bare model and the guard's engines
(batch-64 throughput, batch-1 latency, CPU per image), then each HTTP scenario against each server
in turn, so that a machine's background load hits the bare and the guarded paths alike. The load
comes from ``wrk`` (:mod:`bench.native_load`, installed by the project's set-up) when it is on the
PATH, else from Python client threads (:mod:`bench.load`): ``--load-generator``. Mean batch size
comes from the server's ``badexpert_batch_size`` histogram, its CPU time per image from
``/proc/PID/stat`` over the measured seconds (:mod:`bench.process_cpu`).

Ratios are taken within each round, then their median and range: an HTTP row's throughput over the
bare TorchScript model's batch-64 throughput, its p50 over the bare TorchScript batch-1 forward
(eager's beside them). Outputs: ``serve.json`` and ``serve.md`` in ``--out`` (default
``~/.cache/badexpert/bench/results/``); the table is :mod:`bench.serve_table`'s.
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

from bench.bare_engines import bare_eager, bare_torchscript
from bench.cifar10 import CACHE
from bench.load import batch_counts, get, json_body, multipart_body, png_bytes, run_load
from bench.native_load import run_wrk, wrk_path
from bench.process_cpu import cpu_seconds
from bench.serve_table import table
from defense.allocator import retain_freed_memory
from defense.bundle import load_bundle, save_bundle
from defense.engine import ENGINES, build_engine
from defense.feature_fit import fit_guard_features
from defense.guard import Guard
from defense.models import create_model
from defense.models.loading import ModelSpec
from defense.preprocessing import Preprocessing
from service.settings import ServiceSettings

BUNDLES = CACHE / "bench" / "serve"
RESULTS = CACHE / "bench" / "results"
NUM_CLASSES = 10
_DEFAULTS = ServiceSettings.model_fields  # the server's defaults, as the in-process paths run them
SMALL_BATCH_SIZE = _DEFAULTS["small_batch_size"].default  # its parallel graph serves batches up to it
MERGED_BATCH_SIZE = _DEFAULTS["merged_batch_size"].default  # its merged network serves batches up to it
RETAIN_FREED_MB = _DEFAULTS["retain_freed_mb"].default  # as the server sets its allocator


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


def _timed(function, duration_s: float, minimum: int = 3) -> tuple[list[float], float]:
    """Each call's wall seconds, and this process's CPU seconds over all of them."""
    times, stop, cpu = [], time.perf_counter() + duration_s, time.process_time()
    while len(times) < minimum or time.perf_counter() < stop:
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times, time.process_time() - cpu


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def in_process_paths(bundle: Path, setup: ModelSetup) -> list[tuple[str, object]]:
    """(name, function of a uint8 batch): the bare model eager and TorchScript, the eager guard and
    the guard's other engines, each warmed up; the process's allocator set as the server sets its
    own (the bare paths run under the same setting)."""
    retain_freed_memory(RETAIN_FREED_MB)
    guard, _ = load_bundle(bundle, "cpu")
    batch, one = sample_images(setup, 64), sample_images(setup, 1)
    checks = [sample_images(setup, 2), sample_images(setup, 1), sample_images(setup, 5)]
    engines = {name: build_engine(guard, name, checks) for name in ENGINES if name != "eager"}
    paths = [("bare", bare_eager(guard)), ("bare_torchscript", bare_torchscript(guard, batch)),
             ("guard", guard.score_batch)]
    paths += [(f"guard_{name}", engine) for name, engine in engines.items() if engine.name == name]
    threads = torch.get_num_threads()
    served = build_engine(guard, "jit", checks, parallel_up_to=SMALL_BATCH_SIZE, split_ways=threads,
                          sliced_over=SMALL_BATCH_SIZE, merged_up_to=MERGED_BATCH_SIZE)
    if served.parallel_up_to:
        paths.append(("guard_jit_served", served_threads(served, threads)))
    for _, function in paths:
        for images in (batch, one, batch, one):  # warm up (TorchScript optimizes on its first calls)
            function(images)
    return paths


def served_threads(engine, large_threads: int):
    """``engine`` called as the server calls it (its defaults): one torch thread for batches of up to
    ``SMALL_BATCH_SIZE`` images (its merged network, then its parallel graph) and for the larger ones
    that it cuts into slices; ``large_threads`` otherwise."""
    def run(images: torch.Tensor):
        torch.set_num_threads(engine.threads_for(len(images), 1, large_threads, SMALL_BATCH_SIZE))
        try:
            return engine(images)
        finally:
            torch.set_num_threads(large_threads)
    return run


def in_process(paths: list[tuple[str, object]], setup: ModelSetup, duration_s: float) -> dict:
    """Each path's batch-64 throughput (and CPU ms per image) and batch-1 latency, in this process."""
    batch, one = sample_images(setup, 64), sample_images(setup, 1)
    results = {}
    for name, function in paths:
        big, big_cpu = _timed(lambda: function(batch), duration_s)
        small, _ = _timed(lambda: function(one), duration_s / 2, minimum=10)
        results[name] = {"batch64_images_per_s": 64 / _median(big), "batch1_ms": 1000 * _median(small),
                         "batch64_cpu_ms_per_image": 1000 * big_cpu / (64 * len(big))}
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def badexpert_command() -> list[str]:
    """This checkout's command: an installed ``badexpert`` script may run another checkout's code
    (an editable install made elsewhere). tests/test_layout.py checks the script's entry point."""
    return [sys.executable, "-m", "badexpert"]


def start_server(bundle: Path, port: int, server_args: list[str], log_path: Path,
                 checkout: Path | None = None) -> subprocess.Popen:
    """``badexpert serve`` on loopback; ``checkout``: another checkout's code, run from its folder (``-m``
    puts the working directory before PYTHONPATH) with it on PYTHONPATH."""
    log = open(log_path, "w")
    environment = None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout)}
    process = subprocess.Popen(badexpert_command() + ["serve", str(bundle), "--port", str(port), "--device", "cpu",
                                                      *server_args], stdout=log, stderr=subprocess.STDOUT,
                               env=environment, cwd=checkout)
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


def load(port: int, body: bytes, content_type: str, scenario: Scenario, duration_s: float, generator: str) -> dict:
    """The measured load: LoadResult.summary()'s fields and the generator's name."""
    if generator == "wrk":
        return run_wrk("127.0.0.1", port, body, content_type, scenario.images_per_request, scenario.clients,
                       duration_s)
    result = run_load("127.0.0.1", port, body, content_type, scenario.images_per_request, scenario.clients,
                      duration_s)
    return {**result.summary(), "generator": "python"}


def http_scenario(port: int, pid: int, setup: ModelSetup, scenario: Scenario, duration_s: float,
                  generator: str = "python") -> dict:
    """One scenario against the server on ``port`` (process ``pid``): a short warm-up, then the
    measured load, with the server's mean batch size and CPU milliseconds per answered image."""
    blobs = [png_bytes(image) for image in sample_images(setup, scenario.images_per_request)]
    body, content_type = (multipart_body if scenario.body == "multipart" else json_body)(blobs)
    run_load("127.0.0.1", port, body, content_type, scenario.images_per_request, scenario.clients,
             min(0.5, duration_s / 4))  # warm the connections and the server's path
    images_before, forwards_before = batch_counts("127.0.0.1", port)
    cpu_before = cpu_seconds(pid)
    result = load(port, body, content_type, scenario, duration_s, generator)
    cpu_after = cpu_seconds(pid)
    images_after, forwards_after = batch_counts("127.0.0.1", port)
    forwards = forwards_after - forwards_before
    cpu_ms = None
    if cpu_before is not None and cpu_after is not None and result["images"]:
        cpu_ms = round(1000 * (cpu_after - cpu_before) / result["images"], 3)
    return {"scenario": scenario.name, "clients": scenario.clients, "images_per_request": scenario.images_per_request,
            "body": scenario.body, **result, "server_cpu_ms_per_image": cpu_ms,
            "mean_batch": round((images_after - images_before) / forwards, 2) if forwards else None}


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def bench_model(name: str, duration_s: float, server_args: list[str], out: Path, log=print,
                signals: str = "fused", rounds: int = 3, generator: str = "python",
                before: Path | None = None, before_args: tuple[str, ...] = ()) -> dict:
    """``rounds`` interleaved rounds of every in-process path and every HTTP scenario, against this
    checkout's server ("after") and, with ``before``, one run from that checkout."""
    setup = MODELS[name]
    bundle = bundle_for(name, signals)
    log(f"{name}: preparing the in-process paths (bare eager and TorchScript, the guard's engines)")
    paths = in_process_paths(bundle, setup)
    servers: dict[str, tuple[int, subprocess.Popen]] = {}
    try:
        for label, checkout in (("after", None), ("before", before)) if before else (("after", None),):
            port = free_port()
            arguments = server_args + list(before_args if checkout else ())
            log(f"{name}: starting badexpert serve ({label}) on port {port} {' '.join(arguments)}")
            servers[label] = port, start_server(bundle, port, arguments, out / f"serve-{name}-{label}.log", checkout)
        info = json.loads(get("127.0.0.1", servers["after"][0], "/v1/info")[1])
        measured = []
        for number in range(1, rounds + 1):
            log(f"{name}: round {number} of {rounds}: in-process")
            local = in_process(paths, setup, duration_s)
            rows = {label: [] for label in servers}
            for scenario in SCENARIOS:
                for label, (port, process) in servers.items():
                    log(f"{name}: round {number}: {scenario.name} ({label}, {generator})")
                    rows[label].append(http_scenario(port, process.pid, setup, scenario, duration_s, generator))
            measured.append({"in_process": local, "http": rows})
    finally:
        for _, process in servers.values():
            _stop(process)
    return {"model": name, "arch": setup.arch, "input_size": setup.size, "rounds": measured,
            "batching": info.get("batching"), "server_args": server_args, "generator": generator,
            "before": str(before) if before else None, "before_server_args": list(before_args)}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--duration", type=float, help="seconds per scenario (default 4; 0.6 with --quick)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.6 s per scenario, the first model only")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra 'badexpert serve' argument")
    parser.add_argument("--before", type=Path, help="another checkout of the project: its server is measured too, "
                                                    "interleaved with this checkout's (before/after)")
    parser.add_argument("--before-server-arg", action="append", default=[],
                        help="an extra 'badexpert serve' argument for the --before server only")
    parser.add_argument("--load-generator", default="auto", choices=["auto", "wrk", "python"],
                        help="auto: wrk when it is installed, else Python client threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for serve.json and serve.md")
    parser.add_argument("--signals", default="fused", choices=["expert", "fused"],
                        help="the bundle's signals: fused (the build's default) or the expert's score alone")
    args = parser.parse_args(argv)
    models = args.models or (DEFAULT_MODELS[:1] if args.quick else DEFAULT_MODELS)
    duration = args.duration or (0.6 if args.quick else 4.0)
    rounds = args.rounds or (1 if args.quick else 3)
    generator = args.load_generator if args.load_generator != "auto" else ("wrk" if wrk_path() else "python")
    if generator == "wrk" and wrk_path() is None:
        parser.error("wrk is not installed (scripts/install-deploy-tools.sh installs it)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = [bench_model(name, duration, args.server_arg, args.out, log=lambda text: print(text, flush=True),
                           signals=args.signals, rounds=rounds, generator=generator,
                           before=args.before.resolve() if args.before else None,
                           before_args=tuple(args.before_server_arg)) for name in models]
    markdown = table(results, SCENARIOS)
    summary = {"machine": machine(), "duration_s": duration, "rounds": rounds, "generator": generator,
               "signals": args.signals, "seconds": round(time.monotonic() - started, 1), "results": results}
    (args.out / "serve.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "serve.md").write_text(markdown)
    print(markdown)
    print(f"results: {args.out / 'serve.json'} and {args.out / 'serve.md'} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
