# The two commands of the README:  make demo  and  make test.
# Each creates (or refreshes, when pyproject.toml or the pins change) a local virtual
# environment in .venv and installs the package with its tested pins first.

# The newest Python >= 3.12 that runs (jax >= 0.11 needs it), pyenv's installs included:
# tools/find-python says how it looks.
PYTHON ?= $(shell tools/find-python)
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
CONFIG ?= configs/shapes.py
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -n "$(PYTHON)" || { echo "no Python >= 3.12 found (jax needs it): install one, or run make PYTHON=/path/to/python3.12"; exit 1; }
	$(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || \
	  { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m vard_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
