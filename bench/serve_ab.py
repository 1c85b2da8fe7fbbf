"""Before/after on a noisy machine: several ``badexpert serve`` configurations side by side, their
scenarios interleaved round by round, so that background load hits each the same way.

    python -m bench.serve_ab --clients 1 --images 1 --rounds 4 \\
        "eager=--engine eager" "jit=--engine jit" "before=@/path/to/old/checkout"

Each configuration is ``NAME=ARGS``: extra ``badexpert serve`` arguments, and ``@FOLDER`` to run
the server from another checkout of the project (put first on its PYTHONPATH). Prints, per
configuration, each round's images/s, p50 and p99 (ms) and failed requests, then the medians.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from bench.load import json_body, multipart_body, png_bytes, run_load
from bench.serve import MODELS, bundle_for, free_port, sample_images, start_server


def parse_config(text: str) -> tuple[str, list[str], str | None]:
    name, _, rest = text.partition("=")
    args, checkout = [], None
    for token in shlex.split(rest):
        if token.startswith("@"):
            checkout = str(Path(token[1:]).resolve())
        else:
            args.append(token)
    return name, args, checkout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="NAME=ARGS (badexpert serve arguments; @FOLDER: another checkout)")
    parser.add_argument("--model", default="compact", choices=sorted(MODELS))
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--json", action="store_true", help="JSON bodies instead of multipart")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    setup, bundle = MODELS[args.model], bundle_for(args.model)
    blobs = [png_bytes(image) for image in sample_images(setup, args.images)]
    body, content_type = (json_body if args.json else multipart_body)(blobs)
    servers, logs = {}, Path(tempfile.mkdtemp(prefix="serve_ab."))
    saved = os.environ.get("PYTHONPATH")
    try:
        for text in args.configs:
            name, extra, checkout = parse_config(text)
            if checkout is not None:
                os.environ["PYTHONPATH"] = checkout
            port = free_port()
            try:  # from the checkout's folder: `python -m` puts the working directory before PYTHONPATH
                servers[name] = (port, start_server(bundle, port, extra, logs / f"{name}.log",
                                                    Path(checkout) if checkout else None))
            finally:
                os.environ.pop("PYTHONPATH", None)
                if saved is not None:
                    os.environ["PYTHONPATH"] = saved
        rows = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (port, _) in servers.items():
                run_load("127.0.0.1", port, body, content_type, args.images, args.clients, 0.3)
                result = run_load("127.0.0.1", port, body, content_type, args.images, args.clients, args.duration)
                failed = sum(count for status, count in result.statuses.items() if status != "200")
                rows[name].append((result.images_per_s, result.percentile_ms(50), result.percentile_ms(99), failed))
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(30)
    print(f"{args.model}, {args.clients} clients x {args.images} images ({'JSON' if args.json else 'multipart'}), "
          f"{args.rounds} rounds of {args.duration:g} s: img/s, p50 ms, p99 ms, failed")
    for name, results in rows.items():
        rounds = "  ".join(f"{r[0]:.0f}/{r[1]:.1f}/{r[2]:.1f}/{r[3]}" for r in results)
        medians = [statistics.median(r[i] for r in results) for i in range(3)]
        print(f"  {name:12s} median {medians[0]:7.0f} img/s  p50 {medians[1]:7.1f}  p99 {medians[2]:7.1f}  "
              f"failed {sum(r[3] for r in results)}   rounds: {rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
