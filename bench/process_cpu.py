"""CPU seconds (user + system, all threads) a process has used so far, from ``/proc/PID/stat``:
the server's cost per image, whatever the load generator costs. None where /proc is absent."""

from __future__ import annotations

import os
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_seconds(path: str) -> float | None:
    """User + system CPU seconds from a ``/proc`` stat file (a process's or one thread's); None if unreadable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime: fields 14 and 15 of the line


def cpu_seconds(pid: int) -> float | None:
    return _stat_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each thread of a process has used so far, by native thread id,
    from ``/proc/PID/task/TID/stat``; empty where /proc is absent. A thread that ends between the
    listing and its read is left out."""
    seconds = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return seconds
    for tid in tids:
        used = _stat_seconds(f"/proc/{pid}/task/{tid}/stat")
        if used is not None:
            seconds[int(tid)] = used
    return seconds


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of the whole machine so far, every core summed, from ``/proc/stat``
    (idle and iowait count as not busy); None where /proc is absent."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (total - fields[3] - fields[4]) / TICKS_PER_S, total / TICKS_PER_S
