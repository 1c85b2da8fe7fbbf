"""``GuardService``: everything one app serves with (the guard, the micro-batcher, the metrics, the
audit trail), its loading and shutdown, and the handling of one ``/predict`` request. The routes
are :mod:`service.app`'s.

Loading runs in the background (verify every hash, rebuild the three models, warm up), so the
state goes loading -> ready (or failed), then shutting_down, when the server finishes what is
queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import math
import time
from typing import Callable

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from defense.bundle import load_bundle, package_versions
from defense.device import resolve_device
from defense.engine import GuardEngine, build_engine
from defense.score import GuardScores, guard_scores, rejects
from service.audit import AuditTrail, finite_or_none
from service.batcher import MicroBatcher, Overloaded, ShuttingDown
from service.inputs import (MULTIPART, ByteBudget, InputError, Limits, Reservation, body_budget_exhausted,
                            check_content_length, check_media_type, decode_images, media_type, parse_json,
                            parse_multipart, pixels_within, read_body)
from service.metrics import ServiceMetrics
from service.schemas import InfoResponse
from service.settings import ServiceSettings

log = logging.getLogger("badexpert.serve")

LOADING, READY, FAILED, SHUTTING_DOWN = "loading", "ready", "failed", "shutting_down"
INLINE_PIXELS = 512 * 512  # most pixels (all images of a request) decoded on the event loop of an idle server


class GuardService:
    """Everything one app serves with: the guard, the batcher, metrics, the audit trail."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.audit = AuditTrail(settings.audit_log, settings.quarantine_dir, chain=settings.audit_chain,
                                min_free_bytes=settings.audit_min_free_bytes,
                                max_image_bytes=settings.quarantine_max_image_bytes,
                                max_total_bytes=settings.quarantine_max_bytes,
                                on_not_kept=self.metrics.count_quarantine_skipped)
        self.limits = Limits(settings.max_images_per_request, settings.max_image_bytes, settings.max_request_bytes,
                             settings.max_pixels, settings.max_parts, settings.max_part_header_bytes,
                             tuple(settings.image_format_list))
        self.body_budget = ByteBudget(settings.max_bytes_in_flight)
        self.decode_backlog = 0  # requests waiting for or in the decode threads (event loop only)
        self.show_scores = settings.response_policy == "full"
        self.enforce = settings.mode == "enforce"
        self.state = LOADING
        self.error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None  # set by `badexpert serve`: stop the server
        self.guard = self.manifest = self.batcher = None
        self.info: dict | None = None
        self.class_names: list[str] = []
        self.tau = math.nan
        self.device = "cpu"
        self._streams = None
        self.engine: GuardEngine | None = None
        self._threads = (1, 1)  # torch threads for (small, large) batches, set by load()
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(settings.decode_threads, "badexpert-decode")
        self._audit_pool = concurrent.futures.ThreadPoolExecutor(1, "badexpert-audit")

    # ----- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Blocking: verify and load the bundle, prepare everything per-request work needs, warm up."""
        settings = self.settings
        started = time.monotonic()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        guard, manifest = load_bundle(settings.bundle_dir, self.device, verify_key=settings.verify_key,
                                      allowed_factory_modules=settings.factory_module_list)
        self.guard, self.manifest = guard, manifest
        self.tau = float(guard.rejection_threshold)
        if not math.isfinite(self.tau):  # load_bundle refuses it; never serve one in any case
            raise RuntimeError(f"bundle {settings.bundle_dir}: the threshold {self.tau} is not a finite number")
        self.class_names = list(manifest.class_names)
        if len(self.class_names) != manifest.num_classes:
            raise RuntimeError(f"bundle {settings.bundle_dir}: {len(self.class_names)} class names for "
                               f"{manifest.num_classes} classes")
        self._threads = (settings.small_batch_threads, torch.get_num_threads())
        on_cuda = torch.device(self.device).type == "cuda"
        engine = settings.engine if settings.engine != "auto" else "eager" if on_cuda else "jit"
        self.engine = build_engine(guard, engine, self._check_batches(), on_fallback=log.warning)
        if on_cuda and settings.cuda_streams and self.engine.name == "eager":
            self._streams = [torch.cuda.Stream(device=guard.device) for _ in range(3)]
        self.metrics.bind_bundle(manifest.bundle_id, self.tau, manifest.target_fpr, settings.mode, self.class_names)
        self.audit.open()
        info = InfoResponse(
            bundle_id=manifest.bundle_id, created_at=manifest.created_at, architecture=manifest.architecture,
            class_names=self.class_names, num_classes=manifest.num_classes,
            input_size=list(guard.preprocessing.input_size), mean=list(guard.preprocessing.mean),
            std=list(guard.preprocessing.std), alpha=guard.alpha, threshold=self.tau, target_fpr=manifest.target_fpr,
            calibration={**{k: manifest.threshold.get(k) for k in ("rule", "delta", "n", "k", "expected_fpr")},
                         "calibration_fpr": manifest.threshold.get("calibration_fpr")},
            mode=settings.mode, device=self.device,
            limits={"max_images_per_request": settings.max_images_per_request,
                    "max_image_bytes": settings.max_image_bytes, "max_request_bytes": settings.max_request_bytes,
                    "max_pixels": settings.max_pixels, "max_parts": settings.max_parts,
                    "max_header_bytes": settings.max_header_bytes, "body_timeout_s": settings.body_timeout_s,
                    "image_formats": self.limits.formats},
            batching={"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                      "max_queue": settings.max_queue, "engine": self.engine.name,
                      "small_batch_size": settings.small_batch_size, "torch_threads": list(self._threads)},
            versions={"bundle": manifest.versions, "server": package_versions()},
            response_policy=settings.response_policy,
        ).model_dump()
        if not self.show_scores:  # decision_only: nothing that locates the threshold
            for name in ("alpha", "threshold", "calibration"):
                info.pop(name)
        self.info = info
        if settings.warmup:
            self._warm_up()
        log.info("bundle %s loaded on %s in %.1f s (tau %.6g, mode %s, engine %s)", manifest.bundle_id, self.device,
                 time.monotonic() - started, self.tau, settings.mode, self.engine.name)

    def _check_batches(self) -> list[torch.Tensor]:
        """Random batches of 2, 1 and 5 images that an engine must score as eager does (sizes: a baked-in batch)."""
        height, width = self.guard.preprocessing.input_size
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, 256, (size, 3, height, width), dtype=torch.uint8, generator=generator)
                for size in (2, 1, 5)]

    def _warm_up(self) -> None:
        """One image through the whole path (decode, preprocess, forward, score), then a full batch."""
        from PIL import Image

        height, width = self.guard.preprocessing.input_size
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (127, 127, 127)).save(buffer, format="PNG")
        one = decode_images(self.guard.preprocessing, [buffer.getvalue()], self.settings.max_pixels, self.limits.formats)
        self.infer(one)
        self.infer(one.expand(self.settings.max_batch_size, -1, -1, -1).contiguous())

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.load)
            self.batcher = MicroBatcher(self.infer, self.settings.max_batch_size, self.settings.max_wait_ms,
                                        self.settings.max_queue, on_batch=self.metrics.batch_size.observe,
                                        on_queue_depth=self.metrics.queue_depth.set,
                                        upstream=lambda: self.decode_backlog)
            self.batcher.start()
            self.state = READY
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.state, self.error = FAILED, str(error).splitlines()[0] if str(error) else type(error).__name__
            log.error("cannot serve bundle %s: %s", self.settings.bundle_dir, self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    async def stop(self, loading: asyncio.Task | None) -> None:
        """Stop accepting, finish what is queued, release threads and files."""
        self.state = SHUTTING_DOWN
        if loading is not None and not loading.done():
            loading.cancel()
            try:
                await loading
            except (asyncio.CancelledError, Exception):
                pass
        if self.batcher is not None:
            await self.batcher.close()
        self._decode_pool.shutdown(wait=True)
        self._audit_pool.shutdown(wait=True)
        self.audit.close()

    # ----- inference (runs in the batcher's inference thread) -----------------------------------

    def infer(self, images: torch.Tensor) -> GuardScores:
        small, large = self._threads
        threads = small if len(images) <= self.settings.small_batch_size else large
        if torch.get_num_threads() != threads:  # the inference thread's own setting (one thread runs every forward)
            torch.set_num_threads(threads)
        if self._streams is None:
            return self.engine(images)
        return self._infer_on_streams(images)

    @torch.inference_mode()
    def _infer_on_streams(self, images: torch.Tensor) -> GuardScores:
        """CUDA: the three models on three streams, so that their kernels may overlap."""
        guard = self.guard
        current = torch.cuda.current_stream(guard.device)
        inputs = guard.normalizer(images.to(guard.device, non_blocking=True))
        outputs = []
        for module, stream in zip((guard.model, guard.backdoor_expert, guard.auxiliary_model), self._streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                outputs.append(module(inputs))
            inputs.record_stream(stream)
        for stream, output in zip(self._streams, outputs):
            current.wait_stream(stream)
            output.record_stream(current)
        return guard_scores(*outputs, alpha=guard.alpha).cpu()

    # ----- one request ---------------------------------------------------------------------------

    def prepare(self, kind: str, content_type: str, body: bytes, inline: bool = False) -> tuple | None:
        """Blocking (decode thread): the request's image bytes and their (N, 3, H, W) uint8 tensor. ``inline``
        (on the event loop): None instead when the headers say more than INLINE_PIXELS."""
        blobs = parse_multipart(content_type, body, self.limits) if kind == MULTIPART else parse_json(body, self.limits)
        if inline and not pixels_within(blobs, INLINE_PIXELS, self.limits.formats):
            return None
        return blobs, decode_images(self.guard.preprocessing, blobs, self.limits.max_pixels, self.limits.formats)

    def readiness_problem(self) -> tuple[str, str | None] | None:
        """(status, reason) when requests cannot be answered now, or None when they can."""
        if self.state != READY:
            detail = {LOADING: "the guard is loading its bundle", FAILED: f"the bundle failed to load: {self.error}",
                      SHUTTING_DOWN: "the server is shutting down"}.get(self.state)
            return self.state, detail
        if self.batcher is None or not self.batcher.running:
            return "batcher_stopped", "the batching worker is not running"
        audit_problem = self.audit.problem()
        if audit_problem is not None:
            return "audit_unavailable", audit_problem
        return None

    def unavailable(self, problem: tuple[str, str | None] | None = None) -> JSONResponse:
        problem = problem or self.readiness_problem() or (self.state, None)
        return JSONResponse({"error": "not_ready", "detail": problem[1] or "not ready"}, 503,
                            headers=self._retry_after)

    def overloaded(self, detail: str = "the guard's queue is full; retry shortly") -> JSONResponse:
        self.metrics.overload.inc()
        return JSONResponse({"error": "overloaded", "detail": detail}, 503, headers=self._retry_after)

    def _no_room(self) -> str | None:
        if not self.batcher.has_room(1):
            return "the guard's queue is full; retry shortly"
        if self.decode_backlog >= self.settings.max_decode_backlog:
            return "the guard's decode backlog is full; retry shortly"
        return None

    async def predict(self, request: Request) -> Response:
        problem = self.readiness_problem()
        if problem is not None:
            return self.unavailable(problem)
        kind = media_type(request)
        check_media_type(kind)
        length = check_content_length(request, self.limits)
        full = self._no_room()  # admission before the body is read
        if full is not None:
            return self.overloaded(full)
        # Bytes are taken from the budget as they arrive (a stalled upload holds only what it sent), but a
        # body that could not fit now is refused before reading it.
        if length is not None and self.body_budget.held + length > self.body_budget.limit:
            return self.overloaded(body_budget_exhausted(self._retry_after).detail)
        reservation = Reservation()
        try:
            return await self._admitted(request, kind, reservation)
        except InputError as error:
            if error.code == "overloaded":
                self.metrics.overload.inc()
            raise
        finally:
            self.body_budget.give_back(reservation.bytes)

    async def _admitted(self, request: Request, kind: str, reservation: Reservation) -> Response:
        try:
            body = await asyncio.wait_for(
                read_body(request, self.limits, self.body_budget, reservation, self._retry_after),
                self.settings.body_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise InputError(408, "body_timeout", f"the request body did not arrive within "
                             f"{self.settings.body_timeout_s:g} s")
        full = self._no_room()
        if full is not None:
            return self.overloaded(full)
        content_type, prepared = request.headers.get("content-type", ""), None
        if len(body) <= self.settings.inline_decode_bytes and self.decode_backlog == 0 and self.batcher.idle:
            prepared = self.prepare(kind, content_type, body, inline=True)  # idle server, small images: no thread hop
        if prepared is None:
            self.decode_backlog += 1
            try:
                prepared = await asyncio.get_running_loop().run_in_executor(
                    self._decode_pool, self.prepare, kind, content_type, body)
            finally:
                self.decode_backlog -= 1
        blobs, images = prepared
        del body
        try:
            scores = await self.batcher.submit(images)
        except Overloaded:
            return self.overloaded()
        except ShuttingDown:
            return self.unavailable()
        labels, confidences, values = scores.label.tolist(), scores.confidence.tolist(), scores.score.tolist()
        tau, names = self.tau, self.class_names
        flagged = rejects(scores.score, tau).tolist()  # the guard's one rule: a NaN score is flagged
        hide = self.enforce and not self.settings.reveal_rejected
        predictions = []
        for index, (label, confidence, value, flag) in enumerate(zip(labels, confidences, values, flagged)):
            rejected = flag and self.enforce
            withheld = rejected and hide
            prediction = {
                "index": index, "label": None if withheld else label, "class_name": None if withheld else names[label],
                "confidence": None if withheld else confidence, "score": finite_or_none(value),
                "rejected": rejected, "flagged": flag,
            }
            if not self.show_scores:
                del prediction["score"]
            predictions.append(prediction)
        if any(flagged) and self.audit.enabled:
            failure = await self._audit(request, scores, flagged, blobs, images)
            if failure is not None:
                return failure
        self.metrics.record_inputs(labels, values, flagged)
        answer = {"bundle": self.manifest.bundle_id, "threshold": tau, "mode": self.settings.mode,
                  "predictions": predictions}
        if not self.show_scores:
            del answer["threshold"]
        return JSONResponse(answer)

    async def _audit(self, request: Request, scores: GuardScores, flagged: list[bool], blobs: list[bytes],
                     images: torch.Tensor) -> JSONResponse | None:
        """Write the flagged inputs' records (off the event loop). None when they are on disk; a 503
        (and not ready until the disk has room again) when the disk refused them."""
        labels, values = scores.label.tolist(), scores.score.tolist()
        experts, auxiliaries = scores.expert_agreement.tolist(), scores.auxiliary_agreement.tolist()
        chosen = [i for i, flag in enumerate(flagged) if flag]
        records = [{"request_id": request.state.request_id, "client_request_id": request.state.client_request_id,
                    "index": i, "predicted_class": labels[i], "class_name": self.class_names[labels[i]],
                    "score": finite_or_none(values[i]), "b": finite_or_none(experts[i]),
                    "a": finite_or_none(auxiliaries[i]), "alpha": self.guard.alpha, "tau": self.tau,
                    "mode": self.settings.mode, "bundle": self.manifest.bundle_id}
                   for i in chosen]
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._audit_pool, self.audit.record, records, [blobs[i] for i in chosen], [images[i] for i in chosen])
        except OSError as error:
            reason = f"cannot write the audit trail ({error.strerror or error})"
            self.audit.fail(reason)
            log.error("%s; reporting not ready", reason)
            return JSONResponse({"error": "audit_unavailable", "detail": f"{reason}: the flagged input could not "
                                 "be recorded, so it is not answered"}, 503, headers=self._retry_after)
        return None
