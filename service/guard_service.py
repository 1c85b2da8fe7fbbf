"""``GuardService``: everything one app serves with (the live bundle, the micro-batcher, the metrics,
the audit trail), its loading, hot swaps and shutdown, and the handling of one image request (``/predict``,
and the v2 inference protocol through :meth:`GuardService.handle`). The routes are :mod:`service.app`'s.

Loading runs in the background (verify every hash, rebuild the three models, warm up), so the
state goes loading -> ready (or failed), then shutting_down, when the server finishes what is
queued. A hot swap (:mod:`service.bundle_reload`) replaces the live bundle while ready; each
request keeps the bundle it started on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from defense.device import resolve_device
from defense.score import GuardScores, rejected
from service.audit import AuditTrail
from service.batcher import MicroBatcher, Overloaded, ShuttingDown
from service.decisions import Decisions, attach_signal_parts, audit_records, predict_answer
from service.bundle_reload import BundleReloader
from service.inputs import (ByteBudget, InputError, Limits, Reservation, body_budget_exhausted, check_content_length,
                            check_media_type, media_type, parse_images, read_body_within)
from service.metrics import ServiceMetrics
from service.monitoring import LiveMonitoring, follow_lineup, record_request
from service.served_bundle import ServedBundle, load_served_bundle
from service.shadow import (CandidateDecisions, Lineup, candidate_decisions, check_candidate, lineup_info,
                            score_lineup)
from service.settings import ServiceSettings

log = logging.getLogger("badexpert.serve")

LOADING, READY, FAILED, SHUTTING_DOWN = "loading", "ready", "failed", "shutting_down"
INLINE_PIXELS = 512 * 512  # most pixels (all images of a request) decoded on the event loop of an idle server
BUSY_INLINE_PIXELS = 64 * 64  # of a busy one: a thread hop costs more than decoding this few (docs/serving.md)

# (media type, Content-Type header, body, bundle) -> (the encoded images, or b"" each, and (N, 3, H, W) uint8)
Parse = Callable[[str, str, bytes, ServedBundle], tuple[list[bytes], torch.Tensor]]


class GuardService:
    """Everything one app serves with: the guard, the batcher, metrics, the audit trail."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.metrics = ServiceMetrics(reveal_scores=settings.response_policy == "full")
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
        self.monitoring = LiveMonitoring.for_service(self.metrics.registry, settings)
        self.state = LOADING
        self.error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None  # set by `badexpert serve`: stop the server
        self.lineup: Lineup | None = None  # live bundle and candidate; replaced as a whole, never edited
        self.batcher: MicroBatcher | None = None
        self.device = "cpu"
        self._threads = (1, 1)  # torch threads for (small, large) batches, set by load()
        self.reloader = BundleReloader(lambda folder: self.load_candidate(folder), self.switch,
                                       self.metrics.count_reload)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(settings.decode_threads, "badexpert-decode")
        self._audit_pool = concurrent.futures.ThreadPoolExecutor(1, "badexpert-audit")

    @property
    def live(self) -> ServedBundle | None:
        return None if self.lineup is None else self.lineup.live

    @property
    def info(self) -> dict | None:
        """``/v1/info`` of the live bundle (None until one is loaded)."""
        return None if self.lineup is None else lineup_info(self.lineup, self.show_scores)

    # ----- loading and swapping ------------------------------------------------------------------

    def load(self) -> None:
        """Blocking: verify and load the bundle, prepare everything per-request work needs, warm up."""
        started = time.monotonic()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.device = resolve_device(self.settings.device)
        self._threads = (self.settings.small_batch_threads, torch.get_num_threads())
        live = self.load_candidate(self.settings.bundle_dir)
        candidate = None
        if self.settings.shadow_bundle is not None:
            candidate = self.load_candidate(self.settings.shadow_bundle)
            check_candidate(live, candidate)
        self._set_lineup(Lineup(live, candidate))
        self.metrics.bind_bundle(live.bundle_id, live.tau, live.manifest.target_fpr, self.settings.mode,
                                 live.class_names)
        self.audit.open()
        log.info("bundle %s loaded on %s in %.1f s (tau %.6g, mode %s%s)", live.bundle_id, self.device,
                 time.monotonic() - started, live.tau, self.settings.mode,
                 f"; candidate {candidate.bundle_id} in shadow" if candidate else "")

    def load_candidate(self, folder: Path) -> ServedBundle:
        """Blocking: a bundle verified, loaded and warmed up exactly as at startup (not switched in)."""
        return load_served_bundle(self.settings, folder, self.device, self.limits, self._threads[1])

    def switch(self, candidate: ServedBundle) -> ServedBundle:
        """On the event loop: make ``candidate`` the live bundle (one assignment); returns the previous one.
        Requests in flight keep the bundle they started on."""
        previous, shadow = self.lineup.live, self.lineup.candidate
        if shadow is not None and shadow.guard.preprocessing.input_size != candidate.guard.preprocessing.input_size:
            log.warning("candidate %s dropped: its input size differs from the new live bundle's", shadow.bundle_id)
            shadow = None
        self._set_lineup(Lineup(candidate, None if shadow is candidate else shadow))
        self.metrics.bind_bundle(candidate.bundle_id, candidate.tau, candidate.manifest.target_fpr,
                                 self.settings.mode, candidate.class_names)
        return previous

    def set_candidate(self, candidate: ServedBundle | None) -> None:
        """On the event loop: put ``candidate`` in shadow beside the live bundle (None: no candidate)."""
        if candidate is not None:
            check_candidate(self.lineup.live, candidate)
        self._set_lineup(Lineup(self.lineup.live, candidate))

    def _set_lineup(self, lineup: Lineup) -> None:
        self.lineup = lineup
        follow_lineup(self.metrics, self.monitoring, lineup)

    def promote(self, trigger: str) -> tuple[str, str]:
        """On the event loop: the candidate in shadow becomes live. Returns (new, previous) bundle ids."""
        candidate = self.lineup.candidate if self.lineup is not None else None
        if candidate is None:
            raise LookupError("no candidate bundle in shadow to promote")
        previous = self.switch(candidate)
        self.metrics.count_reload("success")
        log.info("candidate %s promoted (%s): now live (was %s)", candidate.bundle_id, trigger, previous.bundle_id)
        return candidate.bundle_id, previous.bundle_id

    def _promote_logged(self, trigger: str) -> None:
        try:
            self.promote(trigger)
        except LookupError as error:
            log.warning("promotion (%s) ignored: %s", trigger, error)

    def promote_soon(self, trigger: str) -> None:
        """From a signal handler: promote the candidate on the event loop."""
        if self._loop is not None and self.state == READY:
            self._loop.call_soon_threadsafe(self._promote_logged, trigger)

    def reload_soon(self, trigger: str) -> None:
        """From a signal handler (any thread): reload the configured bundle path in the background."""
        loop = self._loop
        if loop is None or self.state != READY:
            log.warning("bundle reload (%s) ignored: the server is %s", trigger, self.state)
            return
        loop.call_soon_threadsafe(self.reloader.reload_in_background, self.settings.bundle_dir, trigger)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._loop.run_in_executor(None, self.load)
            self.batcher = MicroBatcher(self.infer, self.settings.max_batch_size, self.settings.max_wait_ms,
                                        self.settings.max_queue, on_batch=self.metrics.batch_size.observe,
                                        on_queue_depth=self.metrics.queue_depth.set,
                                        upstream=lambda: self.decode_backlog,
                                        lanes=self.live.lanes,
                                        spread_up_to=self.settings.small_batch_size)
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
        await self.reloader.close()
        if self.batcher is not None:
            await self.batcher.close()
        self._decode_pool.shutdown(wait=True)
        self._audit_pool.shutdown(wait=True)
        self.audit.close()

    # ----- inference (runs in the batcher's inference thread) -----------------------------------

    def infer(self, images: torch.Tensor, lineup: Lineup | None = None, cores: int | None = None) -> GuardScores:
        """Blocking (an inference thread): ``images`` scored by ``lineup`` (default: the live one) on ``cores``."""
        lineup = lineup or self.lineup
        threads = lineup.live.engine.threads_for(len(images), *self._threads, self.settings.small_batch_size, cores)
        if torch.get_num_threads() != threads:  # this inference thread's own setting, kept between its batches
            torch.set_num_threads(threads)
        return score_lineup(lineup, images, self.metrics.candidate_failures.inc, cores)

    # ----- one request ---------------------------------------------------------------------------

    def prepare(self, kind: str, content_type: str, body: bytes, bundle: ServedBundle | None = None,
                inline: int = 0) -> tuple[list[bytes], torch.Tensor] | None:
        """Blocking: :func:`service.inputs.parse_images` with the bundle's preprocessing (default: the live one's)."""
        return parse_images(kind, content_type, body, self.limits, (bundle or self.live).guard.preprocessing, inline)

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
        """POST /predict: multipart or JSON base64 images in, the guard's decisions out."""
        return await self.handle(request, check_media_type, self.prepare,
                                 lambda decisions: predict_answer(decisions, self.settings), inline=True)

    async def handle(self, request: Request, check_kind: Callable[[str], None], parse: Parse,
                     answer: Callable[[Decisions], Response], inline: bool = False) -> Response:
        """One image request on any endpoint: admission, the body within the limits, ``parse`` in a decode
        thread (body -> image bytes and uint8 tensor, through service.inputs), the batcher, the audit
        trail, metrics; ``answer`` formats the decisions. The request keeps the bundle it starts on.
        ``inline``: ``parse`` takes ``inline=PIXELS`` and may then decode a small body on the event loop
        (it returns None when the images hold more pixels than that)."""
        problem = self.readiness_problem()
        if problem is not None:
            return self.unavailable(problem)
        lineup = self.lineup  # a hot swap from here on does not change this request's guard
        kind = media_type(request)
        check_kind(kind)
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
            return await self._admitted(request, kind, reservation, lineup, parse, answer, inline)
        except InputError as error:
            if error.code == "overloaded":
                self.metrics.overload.inc()
            raise
        finally:
            self.body_budget.give_back(reservation.bytes)

    async def _admitted(self, request: Request, kind: str, reservation: Reservation, lineup: Lineup,
                        parse: Parse, answer: Callable[[Decisions], Response], inline: bool) -> Response:
        bundle = lineup.live
        try:
            body = await read_body_within(self.settings.body_timeout_s, request, self.limits, self.body_budget,
                                          reservation, self._retry_after)
        except (asyncio.TimeoutError, TimeoutError):
            raise InputError(408, "body_timeout", f"the request body did not arrive within "
                             f"{self.settings.body_timeout_s:g} s")
        full = self._no_room()
        if full is not None:
            return self.overloaded(full)
        content_type, prepared = request.headers.get("content-type", ""), None
        if inline and len(body) <= self.settings.inline_decode_bytes and self.decode_backlog == 0:  # no thread hop
            prepared = parse(kind, content_type, body, bundle, inline=INLINE_PIXELS if self.batcher.idle else BUSY_INLINE_PIXELS)
        if prepared is None:
            self.decode_backlog += 1
            try:
                prepared = await asyncio.get_running_loop().run_in_executor(
                    self._decode_pool, parse, kind, content_type, body, bundle)
            finally:
                self.decode_backlog -= 1
        blobs, images = prepared
        del body
        try:
            scores = await self.batcher.submit(images, lineup)
        except Overloaded:
            return self.overloaded()
        except ShuttingDown:
            return self.unavailable()
        score_list = scores.score.tolist()
        flagged = rejected(score_list, bundle.tau)  # the guard's one rule: a NaN score is flagged
        decisions = Decisions(bundle, scores.label.tolist(), scores.confidence.tolist(), score_list,
                              flagged, [flag and self.enforce for flag in flagged])
        if self.show_scores:  # the signals' parts are answered only with the full response policy
            attach_signal_parts(decisions, scores)
        candidate = candidate_decisions(lineup, scores)
        if (any(flagged) or (candidate is not None and any(candidate.flagged))) and self.audit.enabled:
            failure = await self._audit(request, bundle, scores, flagged, blobs, images, candidate)
            if failure is not None:
                return failure
        record_request(self.metrics, self.monitoring, bundle, decisions, flagged, candidate)
        return answer(decisions)

    async def _audit(self, request: Request, bundle: ServedBundle, scores: GuardScores, flagged: list[bool],
                     blobs: list[bytes], images: torch.Tensor,
                     candidate: CandidateDecisions | None = None) -> JSONResponse | None:
        """Write the flagged inputs' records (off the event loop). None when they are on disk; a 503
        (and not ready until the disk has room again) when the disk refused them. With a candidate in
        shadow, the images it alone flags are recorded too; each line then says both decisions."""
        chosen = [i for i, flag in enumerate(flagged) if flag or (candidate is not None and candidate.flagged[i])]
        records = audit_records(request.state, bundle, scores, flagged, chosen, self.settings.mode, candidate)
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
