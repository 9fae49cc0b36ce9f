# The two commands a newcomer needs: `make serve` and `make test`. Each creates .venv and
# installs what it needs first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint bench check-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/sidecar serve $(ARGS)

check-config: $(STAMP)
	$(BIN)/sidecar check-config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Needs wrk (Debian package `wrk`); installs it when run as root and it is missing.
bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk; } || \
		{ echo "bench needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python -m tests.bench.gateway $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
