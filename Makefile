# The two commands of the README: `make demo` and `make test`.
# Each sets everything up (virtualenv, the project, the example handler
# package, system tools) and then runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean system-tools package

setup: $(VENV)/.installed system-tools

$(VENV)/.installed: setup.cfg pyproject.toml tests/example_handler/setup.cfg
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,server]' -e tests/example_handler
	touch $@

system-tools:
	@bash packaging/ensure-system-tools.sh

demo: setup
	$(BIN)/python -m taskserver.demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench

# dist/: the sdist, the wheel and the .deb (see docs/install.md).
package:
	PY=$(PY) bash packaging/build-package.sh dist

clean:
	rm -rf $(VENV) build dist *.egg-info demo-run
