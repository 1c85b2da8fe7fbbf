#!/usr/bin/env bash
# Installs the tools that tests/test_deploy*.py validate the deployment files with. Idempotent:
# when everything is present it only checks, in well under a second.
#
#   Debian packages   prometheus (prometheus + promtool), docker-compose (Compose 1.29, Python),
#                     nginx (nginx -t on the load balancer configuration)
#   Debian, optional  wrk (bench.serve's native HTTP load generator): installed on its own, and a
#                     failure only says so (the bench then uses Python client threads)
#   PyPI, into .venv  kubernetes-validate (Kubernetes JSON schemas, offline),
#                     dockerfile (BuildKit's own Dockerfile parser), PyYAML; all three are in
#                     pyproject's test extras too, so `make test` has them already
#
# `make test` runs this script first. Debian packages need root (or passwordless sudo) and apt-get;
# without them the script names what is missing and the tests that need it skip with that reason,
# and the test summary lists them. With CI=true (.ci/run) a missing tool is an error here, and a
# skipped deployment test fails the suite. Services are never started: a package's post-install
# start is denied while this script installs.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PIP_PACKAGES=(PyYAML kubernetes-validate==1.37.0 dockerfile==3.4.0)  # also in pyproject's test extras

SBIN=${DEPLOY_TOOLS_SBIN:-/usr/sbin}  # where Debian puts nginx, often not on a user's PATH

say() { echo "install-deploy-tools: $*"; }

missing_apt=()
command -v promtool > /dev/null && command -v prometheus > /dev/null || missing_apt+=(prometheus)
command -v docker-compose > /dev/null || missing_apt+=(docker-compose)
command -v nginx > /dev/null || [ -x "$SBIN/nginx" ] || missing_apt+=(nginx)

if [ ${#missing_apt[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then SUDO="sudo -n"; else SUDO=none; fi
    fi
    if [ "$SUDO" = none ] || ! command -v apt-get > /dev/null; then
        say "cannot install ${missing_apt[*]} (needs apt-get as root): the tests that use them will skip"
    else
        say "apt-get install ${missing_apt[*]}"
        # Deny service starts during the install (Debian's policy-rc.d convention); restore after.
        policy=/usr/sbin/policy-rc.d
        created_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" > /dev/null
            $SUDO chmod 755 "$policy"
            created_policy=1
        fi
        cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
        trap cleanup EXIT
        export DEBIAN_FRONTEND=noninteractive
        if ! $SUDO apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 "${missing_apt[@]}" > /tmp/install-deploy-tools.apt.log 2>&1; then
            $SUDO apt-get update -qq > /dev/null 2>&1 || true
            $SUDO apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 "${missing_apt[@]}" > /tmp/install-deploy-tools.apt.log 2>&1 \
                || { say "apt-get failed (log: /tmp/install-deploy-tools.apt.log); the tests that need ${missing_apt[*]} will skip"; tail -5 /tmp/install-deploy-tools.apt.log; }
        fi
        cleanup
        trap - EXIT
    fi
fi

# Optional: wrk, for bench.serve; apt-get as root (or passwordless sudo) only, and never an error.
if ! command -v wrk > /dev/null; then
    if [ "$(id -u)" = 0 ]; then WRK_SUDO=""; elif command -v sudo > /dev/null && sudo -n true 2> /dev/null; then WRK_SUDO="sudo -n"; else WRK_SUDO=none; fi
    if [ "$WRK_SUDO" != none ] && command -v apt-get > /dev/null; then
        say "apt-get install wrk (optional: bench.serve's load generator)"
        DEBIAN_FRONTEND=noninteractive $WRK_SUDO apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 wrk \
            > /tmp/install-deploy-tools.wrk.log 2>&1 || say "wrk not installed (log: /tmp/install-deploy-tools.wrk.log): bench.serve uses Python client threads"
    fi
fi

# Python tools go into the project's virtual environment (the one `make test` uses and creates).
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('yaml', 'kubernetes_validate', 'dockerfile')) else 1)" > /dev/null 2>&1; then
    say "pip install ${PIP_PACKAGES[*]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}" \
        || say "pip install failed: the tests that need ${PIP_PACKAGES[*]} will skip"
fi

report() { if command -v "$1" > /dev/null || [ -x "$SBIN/$1" ]; then echo "yes"; else echo "MISSING"; fi; }
python_tools=$("$VENV/bin/python" -c 'import yaml, kubernetes_validate, dockerfile; print("yes")' 2> /dev/null || echo MISSING)
summary="promtool $(report promtool), prometheus $(report prometheus), docker-compose $(report docker-compose), nginx $(report nginx), python tools $python_tools"
say "$summary; optional: wrk $(report wrk)"
case "$summary" in
    *MISSING*)
        say "the deployment tests that need the MISSING tools will skip: as root, run"
        say "    apt-get install prometheus docker-compose nginx && $VENV/bin/pip install -e '.[test]'"
        case "$(printf '%s' "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
            1|true|yes|on) say "CI=true: every deployment test must run; stopping"; exit 1 ;;
        esac
        ;;
esac
