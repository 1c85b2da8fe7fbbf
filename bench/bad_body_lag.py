"""The event loop's lag while bad bodies arrive (issue 28): 1,000,000-item JSON bodies to /predict
and to the v2 `inputs` path, two senders each, from other processes, against a real server (uvicorn
in this process, a task on its loop sleeping 2 ms at a time and recording how late it wakes).

    python -m bench.bad_body_lag BUNDLE [--rounds 3]

Before the fix the lag reached 12 s (every request, /healthz included, waited for the validation
errors of a million items); after it, bodies are refused (413 too_many_values) before parsing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import threading
import time

MILLION = ("[" + ",".join(["1"] * 1_000_000) + "]").encode()
BODIES = {"/predict": b'{"images": ' + MILLION + b"}",
          "/v2/models/badexpert-guard/infer": b'{"inputs": ' + MILLION + b"}"}


def send(port: int, path: str, body: bytes, rounds: int) -> None:
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", port), timeout=120) as connection:
            connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            while connection.recv(65536):
                pass


def main() -> None:
    import httpx
    import uvicorn

    from service.app import create_app
    from service.settings import ServiceSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--rounds", type=int, default=3, help="bodies per sender (default %(default)s)")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(ServiceSettings(bundle=args.bundle, device="cpu", port=port, warmup=False))
    lags: list[float] = []
    measuring = threading.Event()

    async def start_probe():
        async def probe_loop():
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.002)
                if measuring.is_set():
                    lags.append(time.perf_counter() - started - 0.002)

        asyncio.get_running_loop().create_task(probe_loop())
        return {"probing": True}

    app.add_api_route("/lag-probe", start_probe, methods=["GET"])
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(base + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    httpx.get(base + "/lag-probe")
    time.sleep(0.5)
    measuring.set()
    senders = [multiprocessing.Process(target=send, args=(port, path, body, args.rounds))
               for path, body in BODIES.items() for _ in range(2)]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    measuring.clear()
    lags.sort()
    print(f"{len(senders) * args.rounds} bad bodies in {time.monotonic() - started:.2f} s; event-loop lag over "
          f"{len(lags)} probes: median {lags[len(lags) // 2] * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms")
    server.should_exit = True


if __name__ == "__main__":
    main()
