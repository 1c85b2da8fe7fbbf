"""A bounded schemathesis run against the live OpenAPI of a real `badexpert serve` process.

The server is started on 127.0.0.1 (a free port) with the tiny bundle of tests/test_service.py; its
own /openapi.json is loaded with schemathesis, and every operation gets a bounded number of generated
requests, both valid (positive) and schema-violating (negative), checked for:

- `not_a_server_error`: no response is a 5xx;
- `response_schema_conformance`, `status_code_conformance`, `content_type_conformance`: every
  response has a status code, media type and body the published schema documents.

Besides the generated cases (random bytes are rarely images), real sample images are sent as
multipart and as JSON, so the 200 responses (flagged images included: the strict bundle flags some)
are checked against the schema too.

It runs on two servers: without API keys, and with `BADEXPERT_API_KEYS` (and /metrics and the docs
protected too), fuzzed once with the key and once without it (the 401 refusals must conform as
well). Loopback traffic only.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

# Outside CI a missing schemathesis skips (with this reason); in CI (CI=true) conftest turns the skip
# of this integration test into a failure: CI installs `.[test]`, which carries schemathesis.
schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed: pip install -e '.[test]' (it is in the test extras)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from live_server import wait_until_ready  # noqa: E402
from test_service import b64, badexpert_command, free_port  # noqa: E402  (`tiny`: the fixture in conftest.py)

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25  # generated cases per operation and generation mode
API_KEY = "fuzz-key-0123456789abcdef"
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


@contextmanager
def live_server(bundle, log: Path, extra_env: dict[str, str] | None = None):
    """A real `badexpert serve` on loopback (its output in `log`, never a pipe that could fill up);
    yields its base URL once /readyz answers 200. Always terminated (SIGTERM, then kill) on the way out."""
    port = free_port()
    environment = {**os.environ, **(extra_env or {}), "OMP_NUM_THREADS": "1"}
    with log.open("w") as output:
        process = subprocess.Popen(
            badexpert_command() + ["serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                   "--no-access-log", "--torch-threads", "1", "--log-level", "warning"],
            env=environment, stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, log.read_text)
        yield base
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_cases(strategy, base: str, headers: dict[str, str], counts: dict[str, int], seen: dict[str, dict],
              label: str) -> None:
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failure is reported as is
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        response = case.call_and_validate(base_url=base, headers=headers, checks=CHECKS, timeout=30)
        counts[label] += 1
        key = f"{case.media_type or '-'} {response.status_code}"
        seen[label][key] = seen[label].get(key, 0) + 1

    run()


def fuzz(schema, base: str, headers: dict[str, str]) -> tuple[dict[str, int], dict[str, dict]]:
    """Runs every operation of the live schema; returns the number of cases run per operation, and
    how many got each (request media type, response status).
    Raises (with schemathesis' report and a reproducing curl command) on the first failing check."""
    counts: dict[str, int] = {}
    seen: dict[str, dict] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the live schema has no operations"
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} [{mode.value}]"
            counts[label], seen[label] = 0, {}
            try:
                run_cases(operation.as_strategy(generation_mode=mode), base, headers, counts, seen, label)
            except Unsatisfiable:
                # Negative mode on an operation without any input (GET /healthz): nothing to violate.
                assert mode is GenerationMode.NEGATIVE and counts[label] == 0, label
                del counts[label], seen[label]
    return counts, seen


def real_images(schema, base: str, headers: dict[str, str], files) -> dict[str, int]:
    """The sample images as multipart parts and as JSON base64: statuses seen (200 expected with the key)."""
    predict = schema["/predict"]["POST"]
    cases = [predict.Case(media_type="multipart/form-data", body={"file": [path.read_bytes() for path in files]}),
             predict.Case(media_type="application/json", body={"images": [b64(path) for path in files]})]
    statuses = {}
    for case in cases:
        response = case.call_and_validate(base_url=base, headers=headers, checks=CHECKS, timeout=60)
        key = f"{case.media_type} {response.status_code}"
        statuses[key] = statuses.get(key, 0) + 1
    return statuses


@pytest.mark.parametrize("keyed", [False, True], ids=["open", "api-key"])
def test_live_openapi_fuzz_has_no_server_errors_and_conforms(tiny, keyed, tmp_path):
    key_header = {"Authorization": f"Bearer {API_KEY}"}
    extra_env = {"BADEXPERT_API_KEYS": API_KEY, "BADEXPERT_PROTECT_METRICS": "true",
                 "BADEXPERT_PROTECT_DOCS": "true"} if keyed else {}
    # With keys: fuzzed with the key (the operations really run), and without it (refusals conform too).
    passes = {"with key": key_header, "no key": {}} if keyed else {"open": {}}
    started = time.monotonic()
    report = []
    log = tmp_path / "server.log"  # on a failure, the server's traceback is there (pytest keeps tmp_path)
    with live_server(tiny.strict, log, extra_env) as base:
        if keyed:  # the key is really needed: without it the protected operations are refused, not a 5xx
            assert httpx.post(base + "/predict", timeout=10).status_code == 401
            assert httpx.get(base + "/openapi.json", timeout=10).status_code == 401
        schema = schemathesis.openapi.from_url(base + "/openapi.json", headers=key_header if keyed else {}, timeout=10)
        for name, headers in passes.items():
            statuses = real_images(schema, base, headers, tiny.files)
            assert set(statuses) == ({"multipart/form-data 401", "application/json 401"} if name == "no key"
                                     else {"multipart/form-data 200", "application/json 200"}), statuses
            counts, seen = fuzz(schema, base, headers)
            assert all(count > 0 for count in counts.values()), counts
            counts["POST /predict [sample images]"], seen["POST /predict [sample images]"] = 2, statuses
            report.append((name, counts, seen))
    elapsed = time.monotonic() - started
    total = sum(sum(counts.values()) for _, counts, _ in report)
    print(f"\nschemathesis {schemathesis.__version__}: {total} cases in {elapsed:.1f} s (server start included)")
    for name, counts, seen in report:
        for label, count in counts.items():
            print(f"  {name}: {label}: {count} cases, {seen[label]}")
