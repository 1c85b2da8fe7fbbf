"""Suite-wide hooks: no test may skip in CI unless it is on the allowlist below.

- Every test in tests/test_deploy*.py is marked `deploy`; `integration` is marked by hand.
- With CI=true (.ci/run sets it), a skipped test is turned into a failure, and so is a module that
  skips as a whole at import (a module-level ``pytest.importorskip``), unless its node id is in
  ``ALLOWED_SKIPS`` with the reason it may skip: a green CI run has run everything else.
- Outside CI they skip with their reason, and the summary lists the deployment and integration
  tests that did not run and how to install what they need.
"""

from __future__ import annotations

import pytest

from ci import INSTALL_COMMAND, STRICT_MARKERS, ci_strict, is_deploy_module

pytest_plugins = ["pytester"]

_skipped_key = pytest.StashKey[list]()

# Node ids (a test, or a module's path for a whole-module skip) that may skip under CI=true, each with
# the reason. Keep it short: every entry is something a green CI run did not test.
ALLOWED_SKIPS: dict[str, str] = {}


def _allowed(nodeid: str) -> bool:
    return nodeid in ALLOWED_SKIPS or nodeid.split("[", 1)[0] in ALLOWED_SKIPS


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny bundles the service tests serve (tests/test_service.py: Tiny, build_tiny), built once
    per session for every module that uses them (test_service.py, test_fuzz_openapi.py)."""
    import torch

    from test_service import build_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and steadier on a busy machine
    try:
        return build_tiny(tmp_path_factory.mktemp("service"))
    finally:
        torch.set_num_threads(threads)


def pytest_configure(config):
    config.stash[_skipped_key] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_deploy_module(item.path):
            item.add_marker(pytest.mark.deploy)


def _reason(report) -> str:
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or _allowed(item.nodeid):
        return
    markers = [name for name in STRICT_MARKERS if item.get_closest_marker(name)]
    reason = _reason(report)
    if ci_strict():
        report.outcome = "failed"
        what = f"this {markers[0]} test" if markers else "this test"
        report.longrepr = (f"CI=true: {what} skipped, which CI does not allow (tests/conftest.py ALLOWED_SKIPS "
                           f"lists the exceptions): {reason}")
    elif markers:
        item.config.stash[_skipped_key].append(f"{item.nodeid}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and isinstance(collector, pytest.Module)) or _allowed(collector.nodeid):
        return
    reason = _reason(report)
    if ci_strict():
        report.outcome = "failed"
        kind = "deployment module" if is_deploy_module(collector.path) else "module"
        report.longrepr = (f"CI=true: {kind} {collector.path.name} skipped as a whole, which CI does not allow "
                           f"(tests/conftest.py ALLOWED_SKIPS lists the exceptions): {reason}")
    elif is_deploy_module(collector.path):
        collector.config.stash[_skipped_key].append(f"{collector.nodeid} (whole module): {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = config.stash.get(_skipped_key, [])
    if not skipped:
        return
    terminalreporter.section("deployment and integration tests NOT run", sep="=", yellow=True, bold=True)
    terminalreporter.line(f"{len(skipped)} skipped: install their tools with `{INSTALL_COMMAND}` "
                          "(apt-get as root; `make test` runs it), then run the tests again. In CI (CI=true) "
                          "these skips are failures.")
    for line in skipped:
        terminalreporter.line(f"  {line}")
