"""Every setting of the server. Each comes from a ``BADEXPERT_<NAME>`` environment variable or the
``badexpert serve --<name>`` flag (flags win); nothing is read from code edits."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BADEXPERT_"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    bundle: Path = Field(description="bundle folder written by 'badexpert build'")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the three models run (auto: CUDA when present)")
    mode: Literal["enforce", "shadow"] = Field(
        "enforce", description="enforce: flagged inputs are rejected; shadow: nothing is rejected, but scores, "
                               "would-be rejections, metrics and the audit log are produced as in enforce mode")
    reveal_rejected: bool = Field(False, description="keep label, class_name and confidence of rejected inputs (debugging only)")
    max_batch_size: int = Field(64, ge=1, description="most images in the model's forwards at once (with "
                                "concurrent_batches, shared by the batches running together; a larger single "
                                "request still runs as one batch)")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the first queued request waits for others to join its batch")
    max_queue: int = Field(512, ge=1, description="most images waiting for the model; beyond it requests get 503 with Retry-After at once")
    max_images_per_request: int = Field(32, ge=1, description="more images in one request get 413")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest encoded image (413 beyond)")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest request body (413 beyond; checked on Content-Length first)")
    max_pixels: int = Field(25_000_000, ge=1, description="largest decoded image in pixels, checked before decoding (decompression bombs: 413)")
    audit_log: Path | None = Field(None, description="JSON-lines file: one line per flagged input, fsynced before the response")
    quarantine_dir: Path | None = Field(None, description="folder keeping the bytes of flagged inputs, named by their sha256")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503")
    decode_threads: int = Field(2, ge=1, description="threads decoding images (Pillow) off the event loop")
    inline_decode_bytes: int = Field(65536, ge=0, description="a body up to this size, with no other request "
                                     "decoding, is decoded on the event loop without a thread hop: up to 512x512 "
                                     "pixels in all on an idle server (nothing queued or running), 64x64 on a busy "
                                     "one (0: always in the decode threads)")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads for large batches (default: torch's choice)")
    small_batch_size: int = Field(8, ge=0, description="batches of up to this many images run on small_batch_threads "
                                  "torch threads (0: every batch on torch_threads)")
    small_batch_threads: int = Field(1, ge=1, description="torch CPU threads for small batches: the other cores stay "
                                     "free for HTTP and image decoding")
    parallel_forwards: bool = Field(True, description="with the jit engine, one small-batch thread and two or more "
                                    "torch threads for large batches, small batches run B beside M and M' "
                                    "(torch.jit.fork, on torch's inter-op threads): about two forwards' time on two "
                                    "cores instead of three")
    merged_batch_size: int = Field(8, ge=0, description="with the jit engine on CPU, batches of up to this many "
                                   "images (at most small_batch_size) run merged networks (each layer the models' "
                                   "weights side by side as channel groups): where the batch has two cores, M and "
                                   "B merged on one thread and M' beside them on another; on one core, the three "
                                   "merged, one forward of wider operations instead of three. Each kept where a "
                                   "batch of one image and one of this many run no slower through it (for one "
                                   "image only where just the batch is slower), timed at load (0: off; a model "
                                   "with a layer the merge does not rewrite keeps the other graphs)")
    slice_batches: bool = Field(True, description="with the jit engine on CPU and two or more torch threads for "
                                "large batches, a batch over small_batch_size images that has the cores to itself "
                                "(a lone request, with concurrent_batches) is cut into one slice per "
                                "thread, each slice's three forwards on its own thread with one torch thread, "
                                "instead of one forward on an OpenMP team (which waits at every layer for a "
                                "thread that the event loop or decoding holds)")
    concurrent_batches: bool = Field(True, description="on CPU with two or more torch threads for large batches, "
                                     "one lane per thread: batches over small_batch_size images run that many at "
                                     "once, each on its own thread with one torch thread and up to max_batch_size "
                                     "/ threads images, and a lane that finishes takes the next queued requests "
                                     "instead of waiting for the others. A smaller batch waits for every lane, and "
                                     "a lone request takes every free one, as before. Only with the jit engine: the "
                                     "others keep one batch's activations, and get one lane")
    retain_freed_mb: int = Field(256, ge=0, le=65536, description="freed memory (MiB) each of the C allocator's "
                                 "arenas keeps for the next forward instead of returning it to the system (glibc "
                                 "only; 0: glibc's own thresholds, under which forwards off the main thread, as "
                                 "the server runs them, fault their activations' pages back in on every large batch)")
    engine: Literal["auto", "eager", "fused", "jit"] = Field(
        "auto", description="how the three forwards run: eager (module by module), fused (BatchNorm folded, "
                            "channels-last), jit (one frozen TorchScript graph); auto: jit on CPU, eager on CUDA. "
                            "A non-eager engine that does not match the eager scores on warm-up falls back to eager")
    cuda_streams: bool = Field(True, description="on CUDA, run the three models on separate streams")
    warmup: bool = Field(True, description="run warm-up forwards before reporting ready")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long to wait for requests in flight")
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="uvicorn's event loop; auto: uvloop when it is installed, else asyncio")
    http_parser: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="uvicorn's HTTP/1.1 parser; auto: httptools (C) when it is installed, else h11 (Python). "
                            "Both give the same limits, JSON 400s and header timeout")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="server log level")
    access_log: bool = Field(True, description="uvicorn's per-request access log")
    # bundle trust
    verify_key: Path | None = Field(None, description="Ed25519 public key (PEM): refuse a bundle that is not signed "
                                                      "with its private key (badexpert build --sign-key)")
    allow_factory_modules: str = Field("", description="comma-separated modules whose 'module:factory' architecture "
                                                      "named in a bundle may be imported and called")
    v2_model_name: str = Field("badexpert-guard", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                               description="the model name of the Open Inference Protocol v2 routes "
                                           "(/v2/models/NAME/infer)")
    shadow_bundle: Path | None = Field(None, description="a candidate bundle scoring the same batches in shadow: only "
                                       "the live bundle decides; the candidate's would-be decisions go to metrics and "
                                       "the audit log (SIGUSR1 or POST /v1/admin/promote makes it live)")
    # live monitoring (service/monitoring.py, service/drift.py)
    drift_window: int = Field(2000, ge=10, description="images in the window of the clean-score drift statistic "
                              "(badexpert_clean_score_drift), per bundle")
    drift_blocks: int = Field(10, ge=1, description="blocks the drift window slides by (memory: blocks x bins counts)")
    # hot swap (SIGHUP re-reads the bundle path; the admin endpoint loads a folder under admin_bundle_root)
    admin_bundle_root: Path | None = Field(None, description="folder under which POST /v1/admin/bundle may load "
                                           "bundles (unset: the admin endpoints are off, 404)")
    admin_api_keys: SecretStr | None = Field(None, description="comma-separated admin API keys (16+ characters "
                                             "each), needed by /v1/admin/* ('Authorization: Bearer KEY' or "
                                             "'X-API-Key: KEY'); required with admin_bundle_root")
    # access control and what responses reveal
    api_keys: SecretStr | None = Field(None, description="comma-separated API keys (16+ characters each): /predict and "
                                       "/v1/info then need 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (prefer the "
                                       "environment variable to the flag, which other users can see)")
    protect_metrics: bool = Field(True, description="with api_keys or metrics_api_keys: /metrics needs a key (a "
                                  "metrics key when metrics_api_keys is set, else an API key); false only where a "
                                  "network policy keeps /metrics from clients (docs/deploy.md)")
    metrics_api_keys: SecretStr | None = Field(None, description="comma-separated keys (16+ characters each) for "
                                               "/metrics alone, e.g. Prometheus's scrape key: when set, API keys "
                                               "no longer open /metrics")
    protect_docs: bool = Field(False, description="with api_keys: /docs and /openapi.json need a key too")
    response_policy: Literal["full", "decision_only"] = Field(
        "full", description="full: responses carry each score and the threshold; decision_only: no score and no "
                            "threshold in responses or /v1/info (a public deployment hands out no oracle)")
    # audit trail
    audit_chain: bool = Field(False, description="each audit line carries the sha256 of the previous line "
                                                 "('badexpert audit verify FILE' checks the chain)")
    audit_min_free_bytes: int = Field(64 * 1024 * 1024, ge=0, description="below this free space on the audit "
                                      "log's or quarantine's file system the server reports not ready")
    quarantine_max_image_bytes: int = Field(2 * 1024 * 1024, ge=0, description="an original over this size is "
                                            "quarantined as the decoded, resized image instead (PNG)")
    quarantine_max_bytes: int = Field(1024 ** 3, ge=0, description="most bytes kept in the quarantine folder; "
                                      "beyond it images are not kept (counted in badexpert_quarantine_skipped_total)")
    # bounded work per request and in total
    max_parts: int = Field(64, ge=1, description="most multipart parts of any name in one request (413 beyond)")
    max_part_header_bytes: int = Field(8192, ge=64, description="largest headers of one multipart part (413 beyond)")
    max_header_bytes: int = Field(16384, ge=1024, description="largest HTTP request line and headers (431 beyond)")
    body_timeout_s: float = Field(30.0, gt=0, description="time allowed to receive a request body (408 beyond)")
    header_timeout_s: float = Field(10.0, gt=0, description="time allowed to receive the request line and headers "
                                    "from a connection's first byte (the connection is closed beyond)")
    max_bytes_in_flight: int = Field(256 * 1024 * 1024, ge=1, description="most request-body bytes held across all "
                                     "requests at once; beyond it requests get 503 with Retry-After at once")
    max_decode_backlog: int = Field(64, ge=1, description="most requests waiting for or in the decode threads; "
                                    "beyond it requests get 503 with Retry-After before their body is read")
    image_formats: str = Field("PNG,JPEG,WEBP,BMP,GIF", description="comma-separated image formats (Pillow names) "
                               "the server decodes; any other is undecodable (422)")

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceSettings":
        if self.max_images_per_request > self.max_queue:
            raise ValueError(f"max_images_per_request ({self.max_images_per_request}) must not exceed "
                             f"max_queue ({self.max_queue}): such a request could never be queued")
        if self.max_image_bytes > self.max_request_bytes:
            raise ValueError(f"max_image_bytes ({self.max_image_bytes}) must not exceed max_request_bytes ({self.max_request_bytes})")
        if self.max_request_bytes > self.max_bytes_in_flight:
            raise ValueError(f"max_request_bytes ({self.max_request_bytes}) must not exceed max_bytes_in_flight "
                             f"({self.max_bytes_in_flight}): such a request could never be read")
        lists = {"api_keys": self.api_key_list, "admin_api_keys": self.admin_api_key_list,
                 "metrics_api_keys": self.metrics_api_key_list}
        for name, keys in lists.items():
            check_key_list(name, getattr(self, name), keys)
        for (name, keys), (other, other_keys) in itertools.combinations(lists.items(), 2):
            if set(keys) & set(other_keys):
                raise ValueError(f"{name} and {other} share a key: give each role its own keys")
        if self.admin_bundle_root is not None and not self.admin_api_key_list:
            raise ValueError("admin_bundle_root needs admin_api_keys: the admin endpoints never run without a key")
        unknown = [name for name in self.image_format_list if name not in _pillow_formats()]
        if unknown:
            raise ValueError(f"image_formats: unknown format {unknown[0]!r} (Pillow names, e.g. PNG, JPEG, WEBP)")
        return self

    @property
    def api_key_list(self) -> list[str]:
        return split_keys(self.api_keys)

    @property
    def admin_api_key_list(self) -> list[str]:
        return split_keys(self.admin_api_keys)

    @property
    def metrics_api_key_list(self) -> list[str]:
        return split_keys(self.metrics_api_keys)

    @property
    def factory_module_list(self) -> list[str]:
        return [name.strip() for name in self.allow_factory_modules.split(",") if name.strip()]

    @property
    def image_format_list(self) -> list[str]:
        return [name.strip().upper() for name in self.image_formats.split(",") if name.strip()]

    @property
    def bundle_dir(self) -> Path:
        return Path(self.bundle)


def split_keys(value: SecretStr | None) -> list[str]:
    text = value.get_secret_value() if value is not None else ""
    return [key.strip() for key in text.split(",") if key.strip()]


def check_key_list(name: str, value: SecretStr | None, keys: list[str]) -> None:
    """A key setting is unset (or the empty string, as Compose passes an unset variable) or holds keys of
    16+ characters: a value of separators and blanks only would silently serve without keys."""
    if value is not None and value.get_secret_value() != "" and not keys:
        raise ValueError(f"{name} is set but holds no key (only commas or blanks) ({env_name(name)}, "
                         f"--{name.replace('_', '-')}): give keys of 16+ characters, or unset it to serve without them")
    for key in keys:
        if len(key) < 16:
            raise ValueError(f"{name}: each key needs at least 16 characters")


def _pillow_formats() -> set[str]:
    from PIL import Image

    Image.init()
    return set(Image.OPEN)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
