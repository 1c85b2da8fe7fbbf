"""A bounded HTTP load generator for ``bench.serve``: client threads, each on its own keep-alive
``http.client`` connection, POST the same prepared body to ``/predict`` until a request count or a
duration runs out. Every response's status and latency is kept.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

BOUNDARY = "badexpert-bench-boundary"


def png_bytes(image) -> bytes:
    """A (3, H, W) uint8 tensor as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart_body(images: list[bytes]) -> tuple[bytes, str]:
    parts = []
    for index, data in enumerate(images):
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{index}.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def json_body(images: list[bytes]) -> tuple[bytes, str]:
    return json.dumps({"images": [base64.b64encode(data).decode() for data in images]}).encode(), "application/json"


@dataclass
class LoadResult:
    requests: int = 0
    images: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    statuses: Counter = field(default_factory=Counter)  # "200", "503", "error: ConnectionResetError", ...

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000.0 * ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]

    def summary(self) -> dict:
        return {"requests": self.requests, "images": self.images, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 1), "p50_ms": round(self.percentile_ms(50), 2),
                "p99_ms": round(self.percentile_ms(99), 2),
                "mean_ms": round(1000 * statistics.fmean(self.latencies), 2) if self.latencies else None,
                "statuses": dict(self.statuses)}


def run_load(host: str, port: int, body: bytes, content_type: str, images_per_request: int, clients: int,
             duration_s: float, max_requests: int | None = None, timeout_s: float = 60.0) -> LoadResult:
    """``clients`` threads POST ``body`` to /predict for ``duration_s`` (or until ``max_requests`` in
    all have been sent). The clock starts when every thread has connected."""
    result = LoadResult()
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    budget = {"left": max_requests if max_requests is not None else 1 << 62}
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    deadline = [0.0]

    def take() -> bool:
        with lock:
            if budget["left"] <= 0:
                return False
            budget["left"] -= 1
            return True

    def client() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        ready.wait()
        while time.perf_counter() < deadline[0] and take():
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body, headers)
                response = connection.getresponse()
                response.read()
                status = str(response.status)
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException) as error:
                status = f"error: {type(error).__name__}"
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
            elapsed = time.perf_counter() - started
            with lock:
                result.requests += 1
                result.statuses[status] += 1
                if status == "200":
                    result.images += images_per_request
                    result.latencies.append(elapsed)
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline[0] = started + duration_s
    ready.wait()
    for thread in threads:
        thread.join(duration_s + timeout_s + 5)
    result.seconds = time.perf_counter() - started
    return result


def get(host: str, port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def batch_counts(host: str, port: int) -> tuple[float, float]:
    """(images, forwards) so far, from the server's badexpert_batch_size histogram."""
    _, text = get(host, port, "/metrics")
    total = count = 0.0
    for line in text.decode().splitlines():
        if line.startswith("badexpert_batch_size_sum "):
            total = float(line.split()[1])
        elif line.startswith("badexpert_batch_size_count "):
            count = float(line.split()[1])
    return total, count
