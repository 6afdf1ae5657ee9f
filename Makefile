# Developer entry points. `make test` works on a fresh clone: it installs the system tools the
# tests need (ci/install-test-tools.sh) and creates the virtualenv itself.

PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=

.PHONY: venv tools webuis webui-locks lint test demo

venv: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes; the stamp records a finished install.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[gateway,sim,fleetsim,test]'
	touch $@

# Java, Maven, python3-venv, Go, systemd-analyze, shellcheck, cfn-lint, packer: seconds once
# installed. Before the virtualenv: on a fresh machine python3-venv is among what it installs.
tools:
	bash ci/install-test-tools.sh

# The real A1111 and ComfyUI for tests/conformance: virtualenvs under ~/.cache/sdagent, built
# once per set of pins (about 2 minutes and 13 GB the first time), then a hash and a stat.
webuis:
	bash ci/install-webuis.sh

# The locks from the virtualenvs install-webuis.sh built (after changing one by hand, say).
webui-locks: webuis
	bash ci/write-webui-locks.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: tools webuis lint
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/sdagent devstack
