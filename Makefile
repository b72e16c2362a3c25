# Two commands from a fresh clone (see the README):
#   make demo   a .venv with vedrt installed, then the shipped scene model captions examples/
#   make test   a .venv-dev with the dev extras (CI's pins), then the test suite
PYTHON ?= $(if $(shell command -v python3.11),python3.11,python3)
# The CPU build of torch lies in /opt/wheels on the project's machines (as in .ci/run).
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test

demo: .venv/installed
	.venv/bin/vedrt caption examples/*.png examples/*.jpg

test: .venv-dev/installed
	.venv-dev/bin/python -m pytest -q

.venv/installed: pyproject.toml
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q .
	touch $@

.venv-dev/installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv .venv-dev
	.venv-dev/bin/python -m pip install -q $(WHEELS) -c .ci/constraints.txt -e ".[dev]"
	touch $@
