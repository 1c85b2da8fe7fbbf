"""bench/process_cpu.py and bench.serve_profile's CPU table: each thread's CPU from /proc, by name,
and the machine's busy cores."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench.process_cpu import machine_cpu_seconds, thread_cpu_seconds
from bench.serve_profile import cpu_report, thread_names

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux's /proc")


def test_the_spinning_thread_shows_in_the_counters_while_it_runs():
    stop, tid = threading.Event(), []

    def spin():
        tid.append(threading.get_native_id())
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        while not tid:
            time.sleep(0.01)
        first = thread_cpu_seconds(os.getpid())[tid[0]]
        time.sleep(0.5)
        second = thread_cpu_seconds(os.getpid())[tid[0]]
    finally:
        stop.set()
        thread.join()
    assert second - first >= 0.1  # it held the GIL about half the time, against this thread's sleeping


def test_the_machine_counts_busy_within_all():
    busy, every = machine_cpu_seconds()
    assert 0 < busy <= every


def test_threads_are_named_from_py_spy_samples_and_summed_by_name():
    raw = ("thread (101): MainThread;Runner.run (asyncio/runners.py:118) 3\n"
           "thread (102): badexpert-slice_0;_worker (concurrent/futures/thread.py:81) 2\n"
           "thread (0x67): badexpert-slice_1;_worker (concurrent/futures/thread.py:81) 1\n")
    names = thread_names(raw)
    assert names == {101: "MainThread", 102: "badexpert-slice", 103: "badexpert-slice"}
    before = {101: 1.0, 102: 2.0, 103: 2.0, 200: 0.0}
    after = {101: 2.0, 102: 4.0, 103: 3.0, 200: 0.5}  # thread 200: no Python frames sampled
    table = cpu_report(before, after, names, seconds=2.0, images_per_s=100.0, machine=(3.0, 4.0))
    # slices: 3 s over 2 s = 1.50 cores, 15 ms per image at 100 img/s; main 0.50 cores; unnamed 0.25
    assert "| badexpert-slice | 1.50 | 15.000 |" in table
    assert "| MainThread | 0.50 | 5.000 |" in table
    assert "| threads py-spy did not sample | 0.25 | 2.500 |" in table
    assert "| **server, all threads** | **2.25** | **22.500** |" in table
    assert "Machine: 1.50 of 2 cores busy" in table
