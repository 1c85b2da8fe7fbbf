"""When the suite runs in CI, and which tests may not skip there (tests/conftest.py applies it)."""

from __future__ import annotations

import os
from pathlib import Path

# Under CI=true every skip fails the run (tests/conftest.py ALLOWED_SKIPS lists the exceptions); outside CI,
# skips of tests with these markers are listed in the summary with how to install what they need.
STRICT_MARKERS = ("deploy", "integration")
# Every test in these modules is a deployment test (marked `deploy` at collection).
DEPLOY_MODULE_PREFIX = "test_deploy"
INSTALL_COMMAND = "bash scripts/install-deploy-tools.sh"


def ci_strict() -> bool:
    """True under CI=true (or 1/yes/on), as CI services and .ci/run set it."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def is_deploy_module(path: Path) -> bool:
    return Path(path).name.startswith(DEPLOY_MODULE_PREFIX) and Path(path).suffix == ".py"
