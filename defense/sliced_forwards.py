"""A batch cut into slices, each slice's forwards on its own thread with one torch thread
(:class:`SlicedForwards`, used by :mod:`defense.engine` for the jit engine's large batches on CPU)."""

from __future__ import annotations

import concurrent.futures
import weakref
from typing import Callable

import torch


class SlicedForwards:
    """``forwards`` on ``ways`` slices of a batch at once: the first slice on the calling thread, the
    others on threads of its own pool, each with one torch thread; the outputs joined in order.
    ``forwards`` must be safe to call from several threads at once (a frozen TorchScript graph is;
    an eager guard, whose tap holds one batch's activations, is not). The calling thread should run
    on one torch thread too: that is how the slices share the cores."""

    def __init__(self, forwards: Callable[[torch.Tensor], tuple], ways: int):
        if ways < 2:
            raise ValueError(f"slicing a batch needs at least 2 ways, got {ways}")
        self.forwards, self.ways = forwards, ways
        self._pool = concurrent.futures.ThreadPoolExecutor(ways - 1, thread_name_prefix="badexpert-slice",
                                                           initializer=torch.set_num_threads, initargs=(1,))
        weakref.finalize(self, self._pool.shutdown, wait=False)  # a swapped-out bundle's threads end with it

    def _run(self, images: torch.Tensor) -> tuple:
        with torch.inference_mode():  # a mode is per thread: the pool's threads need their own
            return self.forwards(images)

    def __call__(self, images_uint8: torch.Tensor, ways: int | None = None) -> tuple[torch.Tensor, ...]:
        """The outputs of ``forwards(images_uint8)``, from ``ways`` slices (default and most: ``self.ways``)."""
        ways = self.ways if ways is None else min(ways, self.ways)
        first, *others = torch.tensor_split(images_uint8, ways)
        pending = [self._pool.submit(self._run, part) for part in others]
        outputs = [self._run(first)] + [future.result() for future in pending]
        return tuple(torch.cat(pieces) for pieces in zip(*outputs))
