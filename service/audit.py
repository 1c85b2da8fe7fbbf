"""The audit trail of flagged inputs.

Each flagged input appends one JSON line to the audit log, and the request's lines are written,
flushed and fsynced before the response is sent: an answered request is on disk. A failed write is
undone (the file is cut back to its size before the write), so no torn line is left behind.

Each line's key is the server's own request id (``request_id``, never the client's, which is
kept beside it as ``client_request_id``) and the image's index in the request. With chaining on,
each line carries ``prev``, the sha256 of the previous line's bytes (64 zeros for the first line of
a file), so that deleting, editing or inserting a line breaks the chain: ``badexpert audit verify``
checks it.

With a quarantine folder the image bytes are kept too, named by their sha256, for a person to
review, within two caps: an original over ``max_image_bytes`` is kept as the decoded, resized image
(PNG, what the model saw) instead, and nothing more is kept once the folder holds
``max_total_bytes``. Each line says what was kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("badexpert.audit")

GENESIS = "0" * 64  # the 'prev' of a file's first line
FAILURE_RETRY_S = 5.0  # after a failed write, report not ready at least this long
_TAIL_BYTES = 1 << 16


def finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _last_line_digest(path: Path) -> str:
    """sha256 of the file's last complete line (without its newline), or GENESIS for an empty file."""
    with open(path, "rb") as stream:
        stream.seek(0, os.SEEK_END)
        size = stream.tell()
        if size == 0:
            return GENESIS
        stream.seek(max(0, size - _TAIL_BYTES))
        tail = stream.read()
    lines = tail.rstrip(b"\n").split(b"\n")
    return hashlib.sha256(lines[-1]).hexdigest()


class AuditTrail:
    def __init__(self, log_path: Path | None, quarantine_dir: Path | None, *, chain: bool = False,
                 min_free_bytes: int = 0, max_image_bytes: int = 2 * 1024 * 1024, max_total_bytes: int = 1024 ** 3,
                 on_not_kept: Callable[[str], None] | None = None):
        self.log_path = Path(log_path) if log_path else None
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else None
        self.chain = chain
        self.min_free_bytes = min_free_bytes
        self.max_image_bytes = max_image_bytes
        self.max_total_bytes = max_total_bytes
        self._on_not_kept = on_not_kept or (lambda reason: None)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._last_digest = GENESIS
        self._quarantine_bytes = 0
        self._failure: str | None = None
        self._failed_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.log_path is not None or self.quarantine_dir is not None

    def open(self) -> None:
        """At load time: create folders and open the log for appending (fails early on a bad path)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._cut_torn_tail()
            if self.chain:
                self._last_digest = _last_line_digest(self.log_path)
        if self.quarantine_dir is not None:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            self._quarantine_bytes = sum(entry.stat().st_size for entry in self.quarantine_dir.iterdir()
                                         if entry.is_file())

    def _cut_torn_tail(self) -> None:
        """A line without its newline (the process died inside a write) was never answered: remove it,
        so that the next line does not run into it."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.log_path, "rb") as stream:
            stream.seek(max(0, size - _TAIL_BYTES))
            tail = stream.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else max(0, size - len(tail))
        log.warning("audit log %s ended in a torn line of %d bytes (a write cut short); removed it",
                    self.log_path, size - keep)
        os.ftruncate(self._fd, keep)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # ----- health ----------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        self._failure, self._failed_at = reason, time.monotonic()

    def problem(self) -> str | None:
        """Why the trail cannot take records now (a recent failed write, too little free disk), or None."""
        if not self.enabled:
            return None
        if self._failure is not None and time.monotonic() - self._failed_at < FAILURE_RETRY_S:
            return self._failure
        for folder in {p for p in (self.log_path.parent if self.log_path else None, self.quarantine_dir) if p}:
            try:
                stats = os.statvfs(folder)
            except OSError as error:
                return f"cannot check free space on {folder} ({error.strerror or error})"
            free = stats.f_bavail * stats.f_frsize
            if free < self.min_free_bytes:
                return (f"the disk of {folder} has {free} bytes free, below the {self.min_free_bytes} "
                        "the audit trail needs (audit_min_free_bytes)")
        self._failure = None
        return None

    # ----- records ---------------------------------------------------------------------------

    def record(self, records: list[dict], originals: list[bytes], decoded: list[torch.Tensor]) -> list[dict]:
        """Blocking (call it off the event loop): hash and quarantine the images, then append and
        fsync one line per record. Returns the lines written, as dicts. Raises OSError when the
        disk refuses (nothing of the failed write is left in the log)."""
        for record, data, image in zip(records, originals, decoded):
            record["sha256"] = hashlib.sha256(data).hexdigest()
            record["size"] = len(data)
            if self.quarantine_dir is not None:
                record["quarantined"], record["quarantine_file"] = self._quarantine(record["sha256"], data, image)
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        lines = [{"time": now, **record} for record in records]
        if self._fd is None:
            return lines
        with self._lock:
            previous = self._last_digest
            encoded = []
            for line in lines:
                if self.chain:
                    line["prev"] = previous
                data = json.dumps(line, separators=(",", ":"), allow_nan=False).encode()
                previous = hashlib.sha256(data).hexdigest()
                encoded.append(data + b"\n")
            self._append(b"".join(encoded))
            self._last_digest = previous
        return lines

    def _append(self, data: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, size)  # no torn line
            except OSError:
                pass
            raise

    def _quarantine(self, digest: str, data: bytes, image: torch.Tensor) -> tuple[str, str | None]:
        name, kept = digest, "original"
        if len(data) > self.max_image_bytes:
            data, name, kept = _png(image), f"{digest}.resized.png", "resized"
            self._on_not_kept("original_over_image_cap")
            if len(data) > self.max_image_bytes:
                self._on_not_kept("resized_over_image_cap")
                return "none", None
        target = self.quarantine_dir / name
        if target.exists():
            return kept, name
        if self._quarantine_bytes + len(data) > self.max_total_bytes:
            self._on_not_kept("quarantine_full")
            return "none", None
        handle, temporary = tempfile.mkstemp(prefix=".incoming-", dir=self.quarantine_dir)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        self._quarantine_bytes += len(data)
        return kept, name


# ----- verification of a chained log ----------------------------------------------------------------


class ChainBroken(Exception):
    """The log's hash chain does not hold; the message names the line."""


@dataclass(frozen=True)
class ChainReport:
    lines: int
    first_chained_line: int | None
    head: str  # sha256 of the last line: keep it elsewhere to detect a cut tail later


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def verify_chain(path: Path, expected_head: str | None = None) -> ChainReport:
    """Check every line of a chained audit log. Lines before the first chained one (written before
    chaining was turned on) are accepted; after it, every line must carry the previous line's digest."""
    previous: str | None = None
    first_chained: int | None = None
    count = 0
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            count = number
            if not raw.endswith(b"\n"):
                raise ChainBroken(f"line {number} is torn (no newline at its end)")
            data = raw[:-1]
            try:
                line = json.loads(data, parse_constant=_refuse_constant)
            except ValueError as error:
                raise ChainBroken(f"line {number} is not valid JSON ({error})")
            if not isinstance(line, dict):
                raise ChainBroken(f"line {number} is not a JSON object")
            if "prev" in line:
                if line["prev"] != (previous or GENESIS):
                    raise ChainBroken(f"line {number}: the chain breaks here (its prev is not the digest of the line "
                                      "before it): a line was deleted, edited or inserted")
                first_chained = first_chained or number
            elif first_chained is not None:
                raise ChainBroken(f"line {number} has no prev, after chained lines")
            previous = hashlib.sha256(data).hexdigest()
    head = previous or GENESIS
    if expected_head is not None and head != expected_head.lower():
        raise ChainBroken(f"the last line's digest is {head}, not the expected {expected_head}: "
                          "lines at the end were removed or changed")
    return ChainReport(count, first_chained, head)
