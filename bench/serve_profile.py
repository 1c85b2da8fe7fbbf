"""Where a ``badexpert serve`` process spends its time under HTTP load: py-spy samples every thread
of the server while ``wrk`` (or the Python generator) loads ``/predict``, and each sample goes to
the category of its deepest frame that a rule names (HTTP parsing, multipart, PNG decode, tensor
assembly, the three forwards, scoring, response, metrics, audit, ...). docs/serving.md, "Where the
time goes", shows one run.

    pip install -e '.[profile]'      # py-spy
    python -m bench.serve_profile --clients 64 --images 1 --seconds 10
    python -m bench.serve_profile --pid 1234 --port 8000   # a server already running

py-spy reads the process's memory: it needs the same user (or root) and, in a container,
``SYS_PTRACE``. The raw samples are kept (``--out``) for flame graphs.

Beside the samples, each thread's CPU time over the same seconds comes from ``/proc`` (user and
system time, which py-spy's "busy" is not: it counts a thread that is ready to run but waits for a
core as busy), with the machine's busy cores: where they fall short of the cores there are, the
server is waiting on itself, not on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.load import multipart_body, png_bytes
from bench.process_cpu import machine_cpu_seconds, thread_cpu_seconds
from bench.serve import MODELS, Scenario, bundle_for, free_port, load, sample_images, start_server, _stop

# (category, substrings of a frame): a sample goes to the first rule matched by its deepest matching frame
RULES = (
    ("audit trail", ("service/audit.py", "GuardService._audit")),
    ("metrics and live checks", ("prometheus_client", "service/metrics.py", "service/monitoring.py", "record_request",
                                 "service/drift.py")),
    ("PNG decode (Pillow, preprocessing)", ("PIL/", "defense/preprocessing.py", "pixels_within")),
    ("multipart parsing", ("python_multipart", "parse_multipart")),
    ("tensor assembly (stack, cat)", ("decode_images", "torch.cat", "service/batcher.py:16")),
    ("three forwards", ("torch/nn/modules", "defense/engine.py", "torch/jit")),
    ("scoring (scores, decisions)", ("defense/score.py", "defense/feature_signal.py", "defense/guard.py",
                                     "service/shadow.py", "rejects")),
    ("response (answer, JSON, send)", ("predict_answer", "service/decisions.py", "json/", "starlette/responses.py",
                                       "send_with_id", "Transport.write", "http_protocol.py:3", "CoalescingTransport")),
    ("HTTP parsing (h11, uvicorn)", ("h11/", "uvicorn/protocols", "service/http_protocol.py", "httptools")),
    ("access log", ("logging/", "uvicorn/logging")),
    ("framework (routing, middleware)", ("starlette/", "fastapi/", "service/middleware.py", "uvicorn/middleware",
                                         "service/app.py", "service/predict_route.py")),
    ("service (admission, body, batcher)", ("service/guard_service.py", "service/inputs.py", "service/batcher.py")),
    ("thread hand-offs", ("concurrent/futures", "threading.py", "call_soon_threadsafe", "_write_to_self",
                          "_read_from_self")),
    ("event loop", ("asyncio/", "selectors.py")),
)


def category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, keys in RULES:
            if any(key in frame for key in keys):
                return name
    return "other"


def breakdown(raw: str) -> dict[str, collections.Counter]:
    """Samples per thread (name without its pool index) and category, from py-spy's raw output (--threads)."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1].rstrip("0123456789").rstrip("_")
        threads[thread][category(frames[1:])] += int(count)
    return threads


def thread_names(raw: str) -> dict[int, str]:
    """Native thread id -> thread name (without its pool index), from py-spy's raw samples."""
    names = {}
    for line in raw.splitlines():
        head = line.split(";", 1)[0]
        if head.startswith("thread (") and "): " in head:
            tid, name = head[len("thread ("):].split("): ", 1)
            names[int(tid, 0)] = name.rstrip("0123456789").rstrip("_")
    return names


def cpu_report(before: dict[int, float], after: dict[int, float], names: dict[int, str], seconds: float,
               images_per_s: float | None, machine: tuple[float, float] | None) -> str:
    """Each thread's CPU over ``seconds`` (cores, and ms per answered image), threads of one name
    summed; then the machine's busy cores out of all (``machine``: busy and all CPU seconds)."""
    per_name: dict[str, float] = collections.Counter()
    for tid, used in after.items():
        per_name[names.get(tid, "threads py-spy did not sample")] += used - before.get(tid, 0.0)
    lines = ["| thread | CPU, cores (/proc) | CPU ms per image |", "|---|---:|---:|"]
    for name, used in sorted(per_name.items(), key=lambda item: -item[1]):
        if used > 0:
            per_image = f"{1000 * used / seconds / images_per_s:.3f}" if images_per_s else ""
            lines.append(f"| {name} | {used / seconds:.2f} | {per_image} |")
    total = sum(per_name.values())
    per_image = f"{1000 * total / seconds / images_per_s:.3f}" if images_per_s else ""
    lines.append(f"| **server, all threads** | **{total / seconds:.2f}** | **{per_image}** |")
    if machine is not None:
        busy, every = machine
        lines.append(f"\nMachine: {busy / seconds:.2f} of {every / seconds:.0f} cores busy (the load generator included).")
    return "\n".join(lines) + "\n"


def report(threads: dict[str, collections.Counter], seconds: float, rate: int) -> str:
    lines = ["| thread | busy (share of wall time) | category | share of the thread's samples |", "|---|---:|---|---:|"]
    for thread, counts in sorted(threads.items(), key=lambda item: -sum(item[1].values())):
        total = sum(counts.values())
        for index, (name, count) in enumerate(counts.most_common()):
            busy = f"{total / (rate * seconds):.0%}" if index == 0 else ""
            lines.append(f"| {thread if index == 0 else ''} | {busy} | {name} | {count / total:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="compact", choices=sorted(MODELS))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of sampling")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--pid", type=int, help="profile this running server instead of starting one")
    parser.add_argument("--port", type=int, help="its port (with --pid)")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra 'badexpert serve' argument")
    parser.add_argument("--out", type=Path, help="keep py-spy's raw samples here")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed: pip install -e '.[profile]'")
    setup = MODELS[args.model]
    body, content_type = multipart_body([png_bytes(image) for image in sample_images(setup, args.images)])
    scenario = Scenario(f"{args.clients} clients x {args.images} images", args.clients, args.images, "multipart")
    generator = "wrk" if shutil.which("wrk") else "python"
    process = None
    with tempfile.TemporaryDirectory(prefix="badexpert-profile.") as folder:
        if args.pid is None:
            port = free_port()
            process = start_server(bundle_for(args.model), port, args.server_arg, Path(folder) / "serve.log")
            pid = process.pid
        else:
            pid, port = args.pid, args.port
        raw_path = args.out or Path(folder) / "samples.txt"
        try:
            load(port, body, content_type, scenario, 1.0, generator)  # warm up
            result = {}
            loader = threading.Thread(target=lambda: result.update(
                load(port, body, content_type, scenario, args.seconds + 2, generator)))
            loader.start()
            cpu_before, machine_before, started = thread_cpu_seconds(pid), machine_cpu_seconds(), time.monotonic()
            subprocess.run([py_spy, "record", "-p", str(pid), "-d", str(round(args.seconds)), "-r", str(args.rate),
                            "--threads", "--nonblocking", "--format", "raw", "-o", str(raw_path)],
                           check=True, capture_output=True)
            cpu_after, machine_after, wall = thread_cpu_seconds(pid), machine_cpu_seconds(), time.monotonic() - started
            loader.join()
            raw = raw_path.read_text()
        finally:
            if process is not None:
                _stop(process)
    print(f"{args.model}, {scenario.name} ({generator}): {result.get('images_per_s')} img/s, "
          f"p50 {result.get('p50_ms')} ms, statuses {result.get('statuses')}")
    print(report(breakdown(raw), args.seconds, args.rate))
    machine = None if machine_before is None or machine_after is None else \
        tuple(late - early for late, early in zip(machine_after, machine_before))
    print(cpu_report(cpu_before, cpu_after, thread_names(raw), wall, result.get("images_per_s"), machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
