"""The test command itself: `make test` (the README's command) and .ci/run install and run what the
deployment checks need, and in CI a deployment or integration test that skips fails the run.

These checks live outside tests/test_deploy*.py so that they run even where those skip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SCRIPT = REPO / "scripts" / "install-deploy-tools.sh"


def extras_of(text: str | None = None) -> list[str]:
    text = text or (REPO / "pyproject.toml").read_text()
    block = re.search(r"^test = \[(.*?)\]", text, re.S | re.M)
    assert block, "pyproject.toml has no test extras"
    return re.findall(r'"([^"]+)"', block.group(1))


def test_the_test_extras_hold_every_python_package_the_suite_needs():
    extras = extras_of()
    names = {re.split(r"[<>=!~ ]", requirement)[0].lower() for requirement in extras}
    assert {"pytest", "httpx", "pyyaml", "kubernetes-validate", "dockerfile"} <= names
    # The install script's pip fallback pins the same versions.
    script_pins = re.search(r"^PIP_PACKAGES=\((.*?)\)", SCRIPT.read_text(), re.M).group(1).split()
    for pin in script_pins:
        if "==" in pin:
            assert pin in extras, f"{pin} (scripts/install-deploy-tools.sh) differs from pyproject's test extras"


def test_make_test_installs_the_tools_then_runs_the_whole_suite(tmp_path):
    make = shutil.which("make")
    assert make, "make is needed for `make test`"
    # A fresh clone: the virtual environment does not exist yet (-n: print the commands, run none).
    result = subprocess.run([make, "-n", "test", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    extras = first(r"pip install .*-e '\.\[test\]'")
    tools = first(r"bash scripts/install-deploy-tools\.sh")
    suite = first(r"-m pytest")
    assert extras < tools < suite, lines
    assert f"VENV={tmp_path / 'venv'}" in lines[tools]  # the tools go into the same environment


def test_ci_runs_the_readme_command_with_ci_true():
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make test\b", readme, re.M), "the README's test command is `make test`"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    strict = next(i for i, line in enumerate(ci) if re.match(r"export CI=true\b", line))
    assert strict < ci.index("make test")


def _fake_path(tmp_path: Path) -> str:
    """A PATH with the few commands the script needs and none of the tools, apt-get or sudo."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("dirname", "id", "tr", "bash", "tail"):
        os.symlink(shutil.which(name), bin_dir / name)
    return str(bin_dir)


@pytest.mark.parametrize("ci, status", [("true", 1), ("", 0)])
def test_install_script_reports_missing_tools_and_fails_only_in_ci(tmp_path, ci, status):
    # Nothing can be installed here (no apt-get, no sudo on this PATH): the script must say what is
    # missing, and under CI=true stop with an error.
    env = {"PATH": _fake_path(tmp_path), "VENV": str(Path(sys.executable).parent.parent), "CI": ci,
           "HOME": str(tmp_path), "DEPLOY_TOOLS_SBIN": str(tmp_path / "sbin")}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stdout + result.stderr
    assert "cannot install prometheus docker-compose nginx" in result.stdout
    assert "nginx MISSING" in result.stdout and "apt-get install prometheus docker-compose nginx" in result.stdout
    assert ("CI=true: every deployment test must run; stopping" in result.stdout) == (status == 1)


# ----- the conftest hook, on a small suite of its own ---------------------------------------------

INNER_TESTS = {
    "test_deploy_thing": """
        import pytest

        def test_needs_a_tool():
            pytest.skip("frobnicate is not installed")

        def test_runs():
            pass
    """,
    "test_deploy_whole": """
        import pytest
        pytest.importorskip("no_such_module_for_this_test")

        def test_never_collected():
            pass
    """,
    "test_other": """
        import pytest

        @pytest.mark.integration
        def test_integration_without_its_data():
            pytest.skip("no data here")

        def test_optional():
            pytest.skip("optional feature")

        @pytest.mark.xfail(reason="known")
        def test_known_failure():
            assert False

        def test_allowed_skip():
            pytest.skip("on the allowlist")
    """,
    # Not a deployment module: a module-level importorskip must fail CI all the same.
    "test_optional_client": """
        import pytest
        pytest.importorskip("no_such_client_for_this_test")

        def test_never_collected():
            pass
    """,
}
ALLOWLIST = 'ALLOWED_SKIPS["test_other.py::test_allowed_skip"] = "the inner suite\'s example of an allowed skip"\n'



@pytest.fixture
def inner_suite(pytester):
    pytester.makeconftest((TESTS / "conftest.py").read_text() + ALLOWLIST)
    pytester.makepyfile(ci=(TESTS / "ci.py").read_text())
    pytester.makepyfile(**{name: text for name, text in INNER_TESTS.items()})
    pytester.makeini("[pytest]\nmarkers =\n    integration: x\n    deploy: x\n")
    return pytester


def test_in_ci_any_skip_off_the_allowlist_fails_the_run(inner_suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = inner_suite.runpytest_subprocess("-p", "no:cacheprovider", "--continue-on-collection-errors")
    # test_needs_a_tool (deploy, by its module), the integration test and the unmarked skip fail; the
    # allowlisted skip and the xfail stay as they are; both modules that skip at import (a deployment
    # module and an ordinary one, as test_fuzz_openapi.py and test_inference_v2.py could) are errors.
    result.assert_outcomes(passed=1, failed=3, skipped=1, xfailed=1, errors=2)
    output = result.stdout.str()
    assert "CI=true: this deploy test skipped, which CI does not allow" in output
    assert "frobnicate is not installed" in output
    assert "CI=true: this integration test skipped" in output
    assert "CI=true: this test skipped, which CI does not allow" in output
    assert "CI=true: deployment module test_deploy_whole.py skipped as a whole" in output
    assert "CI=true: module test_optional_client.py skipped as a whole" in output
    assert "test_allowed_skip FAILED" not in output.replace("::", " ")
    assert result.ret != 0


def test_the_allowlist_is_short_and_gives_a_reason_for_each_entry():
    import conftest

    assert len(conftest.ALLOWED_SKIPS) <= 5
    for nodeid, reason in conftest.ALLOWED_SKIPS.items():
        assert nodeid.startswith("tests/") and len(reason) >= 20, (nodeid, reason)


def test_outside_ci_they_skip_and_the_summary_says_so(inner_suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = inner_suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=6, xfailed=1)
    output = result.stdout.str()
    assert "deployment and integration tests NOT run" in output
    assert "3 skipped: install their tools with `bash scripts/install-deploy-tools.sh`" in output
    assert "test_deploy_thing.py::test_needs_a_tool: frobnicate is not installed" in output
    assert result.ret == 0
