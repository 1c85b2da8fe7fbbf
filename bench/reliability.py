"""Reliability of `badexpert serve` under hostile and heavy load (issue 15), on a tiny bundle made
here (random tiny_cnn weights, 16x16 inputs: no data set needed; what is measured is the server).

    python -m bench.reliability            # about 2 minutes on 2 CPU cores
    python -m bench.reliability overload   # one probe (starvation, overload, sigkill)

Three probes, each against a fresh `badexpert serve` process on 127.0.0.1:

1. starvation: a normal 1-image request while two 90,000-part multipart bodies (7 MB each) and
   210 stalled uploads (200 with 1 KB of a 5 MB body, 10 with 20 MB of a 50 MB body) are in flight;
   then how many stalled uploads are still open after the body timeout, and the server's RSS;
2. overload: on a slower bundle (random cifar_resnet18 weights, 32x32, one torch thread, so that
   a Python client can offer 10x its capacity), closed-loop capacity with 16 clients, then an
   open-loop offered load of 10x that capacity for 10 s: statuses, latencies of 200s and 503s,
   RSS; and recovery afterwards;
3. SIGKILL: 8 clients send images that are all flagged (the bundle's tau is above every score),
   the server is killed with SIGKILL after 5 s; every answered request must be in the audit log,
   whose lines must all parse and whose hash chain must verify.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from defense.bundle import save_bundle
from defense.guard import Guard
from defense.models import ModelSpec, create_model
from defense.preprocessing import Preprocessing
from service.audit import verify_chain


def make_bundle(folder: Path, tau: float, architecture: str = "tiny_cnn", size: int = 16) -> Path:
    torch.manual_seed(0)
    guard = Guard(*[create_model(architecture, 3).eval() for _ in range(3)],
                  preprocessing=Preprocessing((size, size), (0.5,) * 3, (0.25,) * 3), rejection_threshold=tau)
    fields = {"created_at": "bench", "class_names": ["a", "b", "c"], "num_classes": 3, "target_fpr": 0.1,
              "threshold": {"tau": tau}, "calibration": {}, "accuracy_on_selection": {}, "backdoor_expert": {},
              "auxiliary_model": {}, "settings": {}, "build_seconds": 0.0}
    save_bundle(folder, guard, ModelSpec("registry", architecture, 3), fields)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    def __init__(self, bundle: Path, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "badexpert", "serve", str(bundle), "--port", str(self.port),
                   "--device", "cpu", "--no-access-log", "--log-level", "warning", *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def one_request(base: str, image: bytes, **headers) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.post(base + "/predict", files=[("file", ("x.png", image, "image/png"))], headers=headers,
                          timeout=120)
    return response.status_code, time.monotonic() - started


# ----- 1. starvation ------------------------------------------------------------------------------


def starvation(bundle: Path) -> dict:
    server = Server(bundle, "--body-timeout-s", "5")
    image = png(1)
    try:
        baseline = min(one_request(server.base, image)[1] for _ in range(5))
        rss_before = server.rss_mb()
        boundary = "b0undary"
        many = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="junk"\r\n\r\nx\r\n'.encode()
                        for _ in range(90_000)) + f"--{boundary}--\r\n".encode()
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(many)}\r\n\r\n").encode()
        statuses = []

        def send_many():
            with socket.create_connection(("127.0.0.1", server.port), timeout=120) as connection:
                connection.sendall(head + many)
                statuses.append(int(connection.recv(100).split()[1]))

        senders = [threading.Thread(target=send_many) for _ in range(2)]
        for sender in senders:
            sender.start()
        time.sleep(0.2)
        during_parts = one_request(server.base, image)
        for sender in senders:
            sender.join()
        stalled = []
        for index in range(210):
            length, sent = (50_000_000, 20_000_000) if index < 10 else (5_000_000, 1000)
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            connection.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {length}\r\n\r\n".encode() + b'{"images": ["' + b"A" * sent)
            stalled.append(connection)
        time.sleep(1.0)
        during_stall = one_request(server.base, image)
        rss_stalled = server.rss_mb()
        time.sleep(6.0)
        still_open = 0
        for connection in stalled:
            connection.settimeout(0.2)
            try:
                data = connection.recv(100)
                still_open += 0 if data or data == b"" else 1
            except socket.timeout:
                still_open += 1
            except OSError:
                pass
            connection.close()
        after = one_request(server.base, image)
        return {"baseline_s": baseline, "many_parts_statuses": statuses, "during_many_parts": during_parts,
                "during_210_stalled": during_stall, "stalled_open_after_timeout": still_open,
                "rss_mb": [round(rss_before), round(rss_stalled), round(server.rss_mb())], "after": after}
    finally:
        server.stop()


# ----- 2. overload --------------------------------------------------------------------------------


async def _closed_loop(base: str, image: bytes, clients: int, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def client(http):
        nonlocal done
        while time.monotonic() < deadline:
            response = await http.post(base + "/predict", files=[("file", ("x.png", image, "image/png"))])
            done += response.status_code == 200

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return done / seconds


async def _open_loop(base: str, image: bytes, rate: float, seconds: float) -> tuple[list, float]:
    results = []

    async def one(http):
        started = time.monotonic()
        try:
            response = await http.post(base + "/predict", files=[("file", ("x.png", image, "image/png"))])
            results.append((response.status_code, time.monotonic() - started))
        except httpx.HTTPError as error:
            results.append((type(error).__name__, time.monotonic() - started))

    tasks = []
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=2000)) as http:
        sent = 0
        while time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * rate)
            while sent < due:
                tasks.append(asyncio.create_task(one(http)))
                sent += 1
            await asyncio.sleep(0.002)
        offered = sent / (time.monotonic() - started)
        await asyncio.gather(*tasks)
    return results, offered


def _quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"p50 {pick(0.5) * 1000:.0f} ms, p99 {pick(0.99) * 1000:.0f} ms"


def server_durations(base: str) -> dict[str, float]:
    """The server's own /predict duration histogram (cumulative counts by upper bound)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics").text
    return {sample.labels["le"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "badexpert_request_duration_seconds_bucket"}


def overload(bundle: Path) -> dict:
    server = Server(bundle, "--max-queue", "16", "--max-images-per-request", "16", "--max-decode-backlog", "8",
                    "--torch-threads", "1")
    image = png(2)
    try:
        baseline = min(one_request(server.base, image)[1] for _ in range(5))
        capacity = asyncio.run(_closed_loop(server.base, image, 16, 5.0))
        rss_before = server.rss_mb()
        peak = [rss_before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak.append(server.rss_mb())
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        durations_before = server_durations(server.base)
        results, offered = asyncio.run(_open_loop(server.base, image, 10 * capacity, 10.0))
        stop.set()
        sampler.join()
        durations = {bound: count - durations_before.get(bound, 0) for bound, count in server_durations(server.base).items()}
        total = durations["+Inf"]
        server_side = {f"<= {bound} s": f"{durations[bound] / total:.1%}" for bound in ("0.005", "0.02", "0.1", "0.5", "1.0", "2.0")}
        counts: dict = {}
        for status, _ in results:
            counts[status] = counts.get(status, 0) + 1
        recovery_started = time.monotonic()
        while one_request(server.base, image)[0] != 200:
            if time.monotonic() - recovery_started > 60:
                raise RuntimeError("no 200 within 60 s after the overload")
            time.sleep(0.05)
        recovered = time.monotonic() - recovery_started
        after = statistics.median(one_request(server.base, image)[1] for _ in range(5))
        return {"baseline_s": baseline, "capacity_rps": capacity, "offered_rps": offered, "statuses": counts,
                "server_side_duration_share": server_side,
                "latency_200": _quantiles([t for s, t in results if s == 200]),
                "latency_503": _quantiles([t for s, t in results if s == 503]),
                "rss_mb": [round(rss_before), round(max(peak)), round(server.rss_mb())],
                "first_200_after_s": recovered, "median_after_s": after}
    finally:
        server.stop()


# ----- 3. SIGKILL ---------------------------------------------------------------------------------


def sigkill(bundle: Path, folder: Path) -> dict:
    audit = folder / "audit.jsonl"
    server = Server(bundle, "--audit-log", str(audit), "--audit-chain")
    answered, stop = [], threading.Event()

    def client(number: int):
        image = png(100 + number)
        sequence = 0
        while not stop.is_set():
            sequence += 1
            client_id = f"c{number}-{sequence}"
            try:
                response = httpx.post(server.base + "/predict", files=[("file", ("x.png", image, "image/png"))] * 2,
                                      headers={"X-Request-ID": client_id}, timeout=10)
            except httpx.HTTPError:
                return
            if response.status_code == 200 and all(p["flagged"] for p in response.json()["predictions"]):
                answered.append(client_id)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in clients:
        thread.start()
    time.sleep(5.0)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    stop.set()
    for thread in clients:
        thread.join()
    raw = audit.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""
    records = [json.loads(line) for line in lines[:-1]]
    logged = {record["client_request_id"] for record in records}
    missing = [client_id for client_id in answered if client_id not in logged]
    try:
        report = verify_chain(audit) if not torn else None
        chain = f"intact ({report.lines} lines)" if report else "torn last line"
    except Exception as error:  # noqa: BLE001 - reported, not raised
        chain = f"broken: {error}"
    return {"answered_flagged_requests": len(answered), "missing_from_audit": len(missing),
            "audit_lines": len(records), "torn_last_line": torn, "chain": chain}


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        bundle = make_bundle(folder / "bundle", tau=0.5)
        slow = make_bundle(folder / "slow", tau=0.5, architecture="cifar_resnet18", size=32)
        flag_all = make_bundle(folder / "flag-all", tau=1e30)
        probes = (("starvation", lambda: starvation(bundle)), ("overload", lambda: overload(slow)),
                  ("sigkill", lambda: sigkill(flag_all, folder)))
        chosen = sys.argv[1:] or [name for name, _ in probes]
        for name, probe in probes:
            if name not in chosen:
                continue
            started = time.monotonic()
            result = probe()
            print(json.dumps({"probe": name, "seconds": round(time.monotonic() - started, 1), **result},
                             default=str), flush=True)


if __name__ == "__main__":
    main()
