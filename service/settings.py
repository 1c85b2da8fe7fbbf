"""Every setting of the server. Each comes from a ``BADEXPERT_<NAME>`` environment variable or the
``badexpert serve --<name>`` flag (flags win); nothing is read from code edits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
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
    max_batch_size: int = Field(64, ge=1, description="most images per model forward (a larger single request still runs as one batch)")
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
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    cuda_streams: bool = Field(True, description="on CUDA, run the three models on separate streams")
    warmup: bool = Field(True, description="run warm-up forwards before reporting ready")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long to wait for requests in flight")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="server log level")
    access_log: bool = Field(True, description="uvicorn's per-request access log")

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceSettings":
        if self.max_images_per_request > self.max_queue:
            raise ValueError(f"max_images_per_request ({self.max_images_per_request}) must not exceed "
                             f"max_queue ({self.max_queue}): such a request could never be queued")
        if self.max_image_bytes > self.max_request_bytes:
            raise ValueError(f"max_image_bytes ({self.max_image_bytes}) must not exceed max_request_bytes ({self.max_request_bytes})")
        return self

    @property
    def bundle_dir(self) -> Path:
        return Path(self.bundle)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
