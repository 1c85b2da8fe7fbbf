"""Suite-wide hooks: deployment and integration tests may not skip in CI.

- Every test in tests/test_deploy*.py is marked `deploy`; `integration` is marked by hand.
- With CI=true (.ci/run sets it), a skip of a `deploy` or `integration` test is turned into a
  failure, and so is a deployment module that skips as a whole at import: a green CI run has run
  them all. Outside CI they skip with their reason, and the summary says how many and how to
  install what they need.
"""

from __future__ import annotations

import pytest

from ci import INSTALL_COMMAND, STRICT_MARKERS, ci_strict, is_deploy_module

pytest_plugins = ["pytester"]

_skipped_key = pytest.StashKey[list]()


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
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    markers = [name for name in STRICT_MARKERS if item.get_closest_marker(name)]
    if not markers:
        return
    reason = _reason(report)
    if ci_strict():
        report.outcome = "failed"
        report.longrepr = f"CI=true: this {markers[0]} test skipped, which CI does not allow: {reason}"
    else:
        item.config.stash[_skipped_key].append(f"{item.nodeid}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(collector, pytest.Module) and is_deploy_module(collector.path):
        reason = _reason(report)
        if ci_strict():
            report.outcome = "failed"
            report.longrepr = f"CI=true: deployment module {collector.path.name} skipped, which CI does not allow: {reason}"
        else:
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
