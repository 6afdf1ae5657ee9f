# Developer entry points. `make test` works on a fresh clone: it creates the virtualenv itself.

PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=

.PHONY: venv test demo

venv: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes; the stamp records a finished install.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/sdagent devstack
