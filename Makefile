# `make demo` and `make test` do all the set-up on a fresh machine (Python 3.10+ with venv).
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/badexpert demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
