"""Helpers for tests that start a real `badexpert serve` process on the loopback interface."""

from __future__ import annotations

import time
from typing import Callable

import httpx


def wait_until_ready(base: str, process, output: Callable[[], str], timeout: float = 90.0) -> None:
    """Poll ``base``/readyz until it answers 200; fail with the server's output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, output()
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.2)
