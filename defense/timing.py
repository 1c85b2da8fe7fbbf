"""Timing a function of an image batch in process: the median of several calls (benches), and the
fastest call of each of several functions, interleaved (the engine's choices at load time)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(function: Callable, images: torch.Tensor, calls: int = 7, warmup: int = 2) -> float:
    """The median wall time of ``function(images)`` over ``calls`` calls, after ``warmup`` calls."""
    with torch.inference_mode():
        times = []
        for call in range(calls + warmup):
            started = time.perf_counter()
            function(images)
            if call >= warmup:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def fastest_seconds(functions: list[Callable], images: torch.Tensor, calls: int = 9, warmup: int = 2) -> list[float]:
    """Each function's fastest wall time on ``images`` over ``calls`` rounds, the functions called in
    turn within a round (after ``warmup`` rounds). Interleaved, a burst of other work on the machine
    slows every function alike; the minimum keeps a call that met no interference (other work only
    ever adds time): two graphs timed one after the other, medians of 7, once read 2.52 against 2.51
    ms on a server loading beside another, where alone they take 2.33 against 2.50."""
    best = [float("inf")] * len(functions)
    with torch.inference_mode():
        for call in range(calls + warmup):
            for index, function in enumerate(functions):
                started = time.perf_counter()
                function(images)
                if call >= warmup:
                    best[index] = min(best[index], time.perf_counter() - started)
    return best
