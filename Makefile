# Kabinet: `make run` runs the bank, `make test` runs every test tier.
# Everything installs into ./.venv from pinned versions (pyproject.toml + constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit test-integration lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/kabinet up

test: $(STAMP) lint
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration and not e2e and not faults"

lint: $(STAMP)
	$(BIN)/ruff check libs services tests bench
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench.relay
	$(BIN)/python -m bench.ledger
	$(BIN)/python -m bench.verify

clean:
	rm -rf $(VENV) .data
