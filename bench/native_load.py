"""The native load generator of ``bench.serve``: ``wrk`` (Debian's package, installed by
``scripts/install-deploy-tools.sh``), one C thread driving every keep-alive connection, so that
the client costs the two shared cores far less than Python threads would. The body is read by a
Lua script that prints wrk's own summary as one JSON line; the result has the shape of
:meth:`bench.load.LoadResult.summary`.

wrk counts a request's latency from its send to its response, and every response that is not a
2xx as ``non-2xx``; socket errors (connect, read, write, timeout) are counted apart.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MARK = "BADEXPERT_WRK "
SCRIPT = """
local file = assert(io.open(os.getenv("BADEXPERT_WRK_BODY"), "rb"))
wrk.body = file:read("*a")
file:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("BADEXPERT_WRK_CONTENT_TYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('%s{"requests": %d, "duration_us": %d, "non_2xx": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f}\\n', os.getenv("BADEXPERT_WRK_MARK"),
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def wrk_path() -> str | None:
    """wrk's path, or None when it is not installed (bench.serve then uses its Python threads)."""
    return shutil.which("wrk")


def run_wrk(host: str, port: int, body: bytes, content_type: str, images_per_request: int, connections: int,
            duration_s: float, timeout_s: float = 60.0) -> dict:
    """``connections`` keep-alive connections POST ``body`` to /predict for ``duration_s`` (whole
    seconds, at least one: wrk's unit). Returns LoadResult.summary()'s fields."""
    with tempfile.TemporaryDirectory(prefix="badexpert-wrk.") as folder:
        body_path, script_path = Path(folder) / "body", Path(folder) / "post.lua"
        body_path.write_bytes(body)
        script_path.write_text(SCRIPT)
        environment = {**os.environ, "BADEXPERT_WRK_BODY": str(body_path), "BADEXPERT_WRK_CONTENT_TYPE": content_type,
                       "BADEXPERT_WRK_MARK": MARK}
        command = [wrk_path() or "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
                   f"--timeout={math.ceil(timeout_s)}s", "-s", str(script_path), f"http://{host}:{port}/predict"]
        completed = subprocess.run(command, env=environment, capture_output=True, text=True,
                                   timeout=duration_s + timeout_s + 30)
    line = next((line for line in completed.stdout.splitlines() if line.startswith(MARK)), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stdout[-1000:]} {completed.stderr[-1000:]}")
    counts = json.loads(line[len(MARK):])
    seconds = counts["duration_us"] / 1e6
    statuses = {"200": counts["requests"] - counts["non_2xx"]} if counts["requests"] > counts["non_2xx"] else {}
    if counts["non_2xx"]:
        statuses["non-2xx"] = counts["non_2xx"]
    for error in ("connect", "read", "write", "timeout"):
        if counts[error]:
            statuses[f"error: {error}"] = counts[error]
    images = statuses.get("200", 0) * images_per_request
    return {"requests": counts["requests"], "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": round(counts["p50_us"] / 1000, 2), "p99_ms": round(counts["p99_us"] / 1000, 2),
            "mean_ms": round(counts["mean_us"] / 1000, 2), "statuses": statuses, "generator": "wrk"}
