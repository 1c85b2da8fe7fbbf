"""defense/allocator.py: freed memory kept for the next forward, and the server setting it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from fastapi.testclient import TestClient

import service.served_bundle
from defense.allocator import _glibc, retain_freed_memory
from service.app import create_app
from test_service import settings, wait_ready

# Page faults per forward of a small conv net (batch 32, 64 channels at 32x32: 8 MiB activations) run
# on a thread other than the main one, as the server runs its forwards; after warm-up.
FAULTS_PER_FORWARD = textwrap.dedent("""
    import resource, sys, threading
    import torch, torch.nn as nn
    from defense.allocator import retain_freed_memory
    retain_freed_memory(int(sys.argv[1]))
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()).eval()
    images = torch.rand(32, 3, 32, 32)
    faults = []
    def forwards():
        with torch.inference_mode():
            for _ in range(3):
                net(images)
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            for _ in range(5):
                net(images)
            faults.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 5)
    thread = threading.Thread(target=forwards)
    thread.start()
    thread.join()
    print(faults[0])
""")


def faults_per_forward(megabytes: int) -> float:
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_FORWARD, str(megabytes)], capture_output=True, text=True,
                          timeout=120, check=True)
    return float(done.stdout.split()[-1])


def test_nothing_set_for_zero_and_a_negative_amount_refused():
    assert retain_freed_memory(0) is False
    with pytest.raises(ValueError, match="0 or more"):
        retain_freed_memory(-1)


@pytest.mark.skipif(_glibc() is None, reason="the thresholds are glibc's; other C libraries are left as they are")
def test_forwards_off_the_main_thread_stop_faulting_their_memory_back_in():
    assert retain_freed_memory(64) is True
    kept, default = faults_per_forward(256), faults_per_forward(0)
    # glibc's own thresholds: each forward faults most of its activations back in (about 10,000 4-KiB
    # pages here); kept: a few hundred
    assert default > 2000, default
    assert kept < default / 10, (kept, default)


@pytest.mark.parametrize("applied", [True, False])
def test_the_server_sets_the_allocator_from_its_setting_and_says_what_it_kept(tiny, monkeypatch, applied):
    calls = []

    def retain(megabytes: int) -> bool:
        calls.append(megabytes)
        return applied  # False: not glibc (or 0 asked)

    monkeypatch.setattr(service.served_bundle, "retain_freed_memory", retain)
    with TestClient(create_app(settings(tiny.bundle, retain_freed_mb=64))) as client:
        wait_ready(client)
        batching = client.get("/v1/info").json()["batching"]
    assert calls == [64]
    assert batching["retained_freed_mb"] == (64 if applied else 0)
