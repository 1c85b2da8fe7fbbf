"""One bundle as the server serves it: the guard, its manifest, threshold, class names, the
``/v1/info`` document and (on CUDA) its streams. :func:`load_served_bundle` is the one way a bundle
comes in, at startup and at every hot swap: verify (digest, weight hashes, signature with the
verify key, factory allowlist, manifest values), rebuild the three models, warm up.

A request keeps the :class:`ServedBundle` it started on until it is answered, so a swap never
changes the guard under a request in flight.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from defense.allocator import retain_freed_memory
from defense.bundle import load_bundle, package_versions
from defense.engine import GuardEngine, build_engine
from defense.guard import Guard
from defense.manifest import Manifest
from defense.self_test_report import self_test_summary
from defense.score import GuardScores
from service.inputs import Limits, decode_images
from service.schemas import InfoResponse
from service.settings import ServiceSettings

log = logging.getLogger("badexpert.serve")


@dataclass
class ServedBundle:
    path: Path  # the resolved folder it was read from (a symlink is followed once, before reading)
    guard: Guard
    manifest: Manifest
    tau: float
    class_names: list[str]
    info: dict
    engine: GuardEngine
    streams: list | None = None
    lanes: int = 1  # batches the server runs at once with this bundle at startup (batch_lanes)
    # concurrent batches take turns through an engine that is not thread-safe (GuardEngine.thread_safe)
    _turns: contextlib.AbstractContextManager = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        thread_safe = self.engine.thread_safe and self.streams is None
        self._turns = contextlib.nullcontext() if thread_safe else threading.Lock()

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    def infer(self, images: torch.Tensor, cores: int | None = None) -> GuardScores:
        """Blocking (one of the batcher's inference threads): the scores of one batch of uint8 images,
        on ``cores`` cores (:meth:`GuardEngine.__call__`)."""
        with self._turns:
            if self.streams is None:
                return self.engine(images, cores)
            return self._infer_on_streams(images)

    @torch.inference_mode()
    def _infer_on_streams(self, images: torch.Tensor) -> GuardScores:
        """CUDA: the three models on three streams, so that their kernels may overlap."""
        guard = self.guard
        current = torch.cuda.current_stream(guard.device)
        inputs = guard.normalizer(images.to(guard.device, non_blocking=True))
        outputs = []
        for module, stream in zip((guard.model, guard.backdoor_expert, guard.auxiliary_model), self.streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                outputs.append(module(inputs))
            inputs.record_stream(stream)
        activations = guard.activations()  # M's feature layers, filled by its forward on the first stream
        for stream, output in zip(self.streams, outputs):
            current.wait_stream(stream)
            output.record_stream(current)
        return guard.scores_from(*outputs, activations)


def batch_lanes(settings: ServiceSettings, large_batch_threads: int, device: str, engine: GuardEngine) -> int:
    """How many batches the server runs at once (``concurrent_batches``): one per large-batch torch
    thread on CPU, where each then runs on one torch thread; one on CUDA, where the device is shared,
    and for an engine whose batches take turns anyway (not :attr:`GuardEngine.thread_safe`; a bundle
    swapped in later with such an engine keeps the server's lanes, and its batches take turns)."""
    on_cuda = torch.device(device).type == "cuda"
    concurrent = settings.concurrent_batches and engine.thread_safe and not on_cuda
    return large_batch_threads if concurrent and large_batch_threads >= 2 else 1


def load_served_bundle(settings: ServiceSettings, folder: Path, device: str, limits: Limits,
                       large_batch_threads: int | None = None) -> ServedBundle:
    """Blocking (run it off the event loop): verify and load the bundle at ``folder``, warm it up.
    Raises (UserError, BundleIntegrityError, ...) with a one-line reason when it cannot be served.
    ``large_batch_threads``: the torch threads of the server's large batches (default: this thread's
    count now; a hot swap passes the count fixed at startup, since the inference thread's setting,
    which changes per batch, is what a new thread would read)."""
    folder = Path(folder).resolve()  # a re-pointed symlink is followed once: every file from one bundle
    guard, manifest = load_bundle(folder, device, verify_key=settings.verify_key,
                                  allowed_factory_modules=settings.factory_module_list)
    tau = float(guard.rejection_threshold)
    if not math.isfinite(tau):  # load_bundle refuses it; never serve one in any case
        raise RuntimeError(f"bundle {folder}: the threshold {tau} is not a finite number")
    class_names = list(manifest.class_names)
    if len(class_names) != manifest.num_classes:
        raise RuntimeError(f"bundle {folder}: {len(class_names)} class names for {manifest.num_classes} classes")
    on_cuda = torch.device(device).type == "cuda"
    engine_name = settings.engine if settings.engine != "auto" else "eager" if on_cuda else "jit"
    # the fork adds a thread: only where torch may use two (its large-batch count), and where the small
    # batches' one thread leaves the other to it
    large_batch_threads = large_batch_threads or torch.get_num_threads()
    parallel_up_to = settings.small_batch_size if settings.parallel_forwards and settings.small_batch_threads == 1 \
        and large_batch_threads >= 2 and not on_cuda else 0
    split_ways = large_batch_threads if settings.slice_batches and large_batch_threads >= 2 and not on_cuda else 1
    merged_up_to = min(settings.merged_batch_size, settings.small_batch_size) if not on_cuda else 0  # small batches only
    # every forward runs off the main thread (defense/allocator.py); 0 where nothing was set (0 asked, not glibc)
    retained_mb = settings.retain_freed_mb if retain_freed_memory(settings.retain_freed_mb) else 0
    engine = build_engine(guard, engine_name, check_batches(guard), on_fallback=log.warning,
                          parallel_up_to=parallel_up_to, split_ways=split_ways, sliced_over=settings.small_batch_size,
                          merged_up_to=merged_up_to)
    lanes = batch_lanes(settings, large_batch_threads, device, engine)
    streams = None
    if on_cuda and settings.cuda_streams and engine.name == "eager":
        streams = [torch.cuda.Stream(device=guard.device) for _ in range(3)]
    served = ServedBundle(folder, guard, manifest, tau, class_names,
                          info_document(settings, limits, guard, manifest, device, engine, retained_mb, lanes),
                          engine, streams, lanes)
    if settings.warmup:
        warm_up(served, settings, limits)
    return served


def check_batches(guard: Guard) -> list[torch.Tensor]:
    """Random batches of 2, 1 and 5 images that an engine must score as eager does (sizes: a baked-in batch)."""
    height, width = guard.preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (size, 3, height, width), dtype=torch.uint8, generator=generator)
            for size in (2, 1, 5)]


def signals_info(manifest: Manifest) -> dict:
    """Which signals decide, from the bundle's record of its feature signal."""
    record = (manifest.model_extra or {}).get("feature_signal")
    if not record:
        return {"rule": "expert", "feature_layers": []}
    return {"rule": record["signals"], "feature_layers": list(record["layers"]),
            "statistic": record.get("statistic")}


def info_document(settings: ServiceSettings, limits: Limits, guard: Guard, manifest: Manifest, device: str,
                  engine: GuardEngine | None = None, retained_freed_mb: int = 0, lanes: int = 1) -> dict:
    """What ``GET /v1/info`` answers for this bundle."""
    info = InfoResponse(
        bundle_id=manifest.bundle_id, created_at=manifest.created_at, architecture=manifest.architecture,
        class_names=list(manifest.class_names), num_classes=manifest.num_classes,
        input_size=list(guard.preprocessing.input_size), mean=list(guard.preprocessing.mean),
        std=list(guard.preprocessing.std), alpha=guard.alpha, threshold=float(guard.rejection_threshold),
        target_fpr=manifest.target_fpr,
        calibration={**{k: manifest.threshold.get(k) for k in ("rule", "delta", "n", "k", "expected_fpr")},
                     "calibration_fpr": manifest.threshold.get("calibration_fpr")},
        mode=settings.mode, device=device,
        limits={"max_images_per_request": settings.max_images_per_request,
                "max_image_bytes": settings.max_image_bytes, "max_request_bytes": settings.max_request_bytes,
                "max_pixels": settings.max_pixels, "max_parts": settings.max_parts,
                "max_header_bytes": settings.max_header_bytes, "body_timeout_s": settings.body_timeout_s,
                "image_formats": limits.formats},
        batching={"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                  "max_queue": settings.max_queue, "engine": engine.name if engine else "eager",
                  "small_batch_size": settings.small_batch_size,
                  "parallel_forwards_up_to": engine.parallel_up_to if engine else 0,
                  "merged_network_up_to": engine.merged_up_to if engine else 0,
                  "merged_pair_up_to": engine.pair_up_to if engine else 0,
                  "large_batch_slices": engine.split_ways if engine else 1,
                  "concurrent_batches": lanes,
                  "retained_freed_mb": retained_freed_mb,
                  "torch_threads": [settings.small_batch_threads,
                                    engine.large_batch_threads(torch.get_num_threads()) if engine
                                    else torch.get_num_threads()]},
        versions={"bundle": manifest.versions, "server": package_versions()},
        response_policy=settings.response_policy, signals=signals_info(manifest),
        self_test=self_test_summary((manifest.model_extra or {}).get("self_test")),
    ).model_dump()
    if settings.response_policy != "full":  # decision_only: nothing that locates the threshold
        for name in ("alpha", "threshold", "calibration", "signals"):
            info.pop(name)
    return info


def warm_up(served: ServedBundle, settings: ServiceSettings, limits: Limits) -> None:
    """One image through the whole path (decode, preprocess, forward, score), then a full batch."""
    from PIL import Image

    height, width = served.guard.preprocessing.input_size
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (127, 127, 127)).save(buffer, format="PNG")
    one = decode_images(served.guard.preprocessing, [buffer.getvalue()], settings.max_pixels, limits.formats)
    served.infer(one)
    served.infer(one.expand(settings.max_batch_size, -1, -1, -1).contiguous())
