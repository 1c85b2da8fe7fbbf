"""When the suite runs in CI, and which tests may not skip there (tests/conftest.py applies it)."""

from __future__ import annotations

import os
from pathlib import Path

# Tests with one of these markers run in CI or fail it: a skip there means something was not tested.
STRICT_MARKERS = ("deploy", "integration")
# Every test in these modules is a deployment test (marked `deploy` at collection).
DEPLOY_MODULE_PREFIX = "test_deploy"
INSTALL_COMMAND = "bash scripts/install-deploy-tools.sh"


def ci_strict() -> bool:
    """True under CI=true (or 1/yes/on), as CI services and .ci/run set it."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def is_deploy_module(path: Path) -> bool:
    return Path(path).name.startswith(DEPLOY_MODULE_PREFIX) and Path(path).suffix == ".py"
