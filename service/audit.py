"""The audit trail of flagged inputs.

Each flagged input appends one JSON line to the audit log, and the request's lines are flushed and
fsynced before the response is sent: an answered request is on disk. With a quarantine folder the
image bytes are kept too, named by their sha256, for a person to review.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path


class AuditTrail:
    def __init__(self, log_path: Path | None, quarantine_dir: Path | None):
        self.log_path = Path(log_path) if log_path else None
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else None
        self._lock = threading.Lock()
        self._stream = None

    @property
    def enabled(self) -> bool:
        return self.log_path is not None or self.quarantine_dir is not None

    def open(self) -> None:
        """At load time: create folders and open the log for appending (fails early on a bad path)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self.log_path, "a", encoding="utf-8")
        if self.quarantine_dir is not None:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    def record(self, records: list[dict], images: list[bytes]) -> list[dict]:
        """Blocking (call it off the event loop): hash and quarantine the bytes, then append and fsync
        one line per record. Returns the lines written, as dicts."""
        for record, data in zip(records, images):
            record["sha256"] = hashlib.sha256(data).hexdigest()
            if self.quarantine_dir is not None:
                self._quarantine(record["sha256"], data)
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        lines = [{"time": now, **record} for record in records]
        if self._stream is None:
            return lines
        text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
        with self._lock:
            self._stream.write(text)
            self._stream.flush()
            os.fsync(self._stream.fileno())
        return lines

    def _quarantine(self, digest: str, data: bytes) -> None:
        target = self.quarantine_dir / digest
        if target.exists():
            return
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
