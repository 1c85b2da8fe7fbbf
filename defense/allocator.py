"""How much freed memory the C allocator keeps for reuse, for forwards run on threads.

glibc gives each thread that allocates an arena of its own. When a forward frees its activations,
an arena other than the main thread's hands the freed top of its heap back to the operating
system, and the next forward takes page faults to get the same memory back. The server runs every
forward off the main thread (the inference thread, and the slice threads of a large batch), so
this cost is paid on every large batch: compact CIFAR ResNet, 2 cores, a batch of 64 in two slices of one
thread each took about 9,500 page faults and 66 ms, against 43 faults and 54 ms once freed memory
stayed (``python -m bench.allocator``; BENCHMARKS.md, "Issue 30f"). The main thread's arena has a
threshold glibc adapts as blocks are freed, which is why a bare model timed on the main thread
does not show it.

:func:`retain_freed_memory` sets glibc's two thresholds once for the process: a freed block up to
32 MiB stays in its arena, and an arena keeps up to the given amount free before it trims. What
is kept is memory a forward already used at its peak, so it is held, not grown. Other C libraries
(macOS, musl) are left as they are.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit systems (half its heap size)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def retain_freed_memory(megabytes: int) -> bool:
    """Let each glibc arena keep up to ``megabytes`` MiB of freed memory (and serve blocks up to 32 MiB
    from it) instead of returning it to the system after every forward. False where nothing was set:
    ``megabytes`` 0, or not glibc."""
    if megabytes < 0:
        raise ValueError(f"megabytes must be 0 or more, got {megabytes}")
    libc = None if megabytes == 0 else _glibc()
    if libc is None:
        return False
    keep = megabytes << 20
    # setting one threshold stops glibc adapting the other, so both are set
    return bool(libc.mallopt(M_MMAP_THRESHOLD, min(keep, MMAP_THRESHOLD_MAX))) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, keep))
