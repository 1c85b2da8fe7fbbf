# `make demo` and `make test` do all the set-up on a fresh machine (Python 3.10+ with venv).
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

.PHONY: install deploy-tools demo test
install: $(VENV)/.installed

# Prometheus, Compose and nginx for tests/test_deploy*.py: apt-get as root (or passwordless sudo);
# otherwise it names what is missing. Idempotent: under a second when everything is there.
deploy-tools: $(VENV)/.installed
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/install-deploy-tools.sh

demo: $(VENV)/.installed
	$(VENV)/bin/badexpert demo

# The whole suite, deployment checks included. With CI=true a deployment or integration test that
# skips fails the run (tests/conftest.py).
test: deploy-tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
