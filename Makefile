# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= 3 + 4 = 7 ; 2 + 5 = 7 ; 9 + 9 = 8 ; 1 + 0 = 1 ; 6 + 2 = 8 ; 4 + 4 =

.PHONY: run test test-extended ci venv bench clean redis browser postgres

venv: $(STAMP)

# torch is pinned (CPU build) in pyproject.toml, in the same resolver call as the rest.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# the service tests and `shadowgate up` start their own redis-server where none answers
redis:
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server) || (sudo apt-get update && sudo apt-get install -y redis-server)

# the MLflow UI approval test drives the system's Chromium (Playwright cannot download one here)
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium) || (sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium)

# the PostgreSQL registry test uses the server on 127.0.0.1:5432 when one answers, else it
# starts its own with initdb + pg_ctl: the server binaries must be installed
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || (apt-get update && apt-get install -y --no-install-recommends postgresql) || (sudo apt-get update && sudo apt-get install -y --no-install-recommends postgresql)

run: $(STAMP) redis
	$(BIN)/shadowgate up

test: $(STAMP) redis browser postgres
	$(BIN)/python -m pytest

# what the default run leaves out: the slow tests (fault injection among them: marker
# `faults`) and the two-node Ray cluster
# (the cluster test in a process of its own: Ray reads RAY_AUTH_MODE when it is first
# imported, and the slow service tests import it without token authentication)
test-extended: $(STAMP) redis browser postgres
	$(BIN)/python -m pytest -m slow
	$(BIN)/python -m pytest -m cluster

ci: test test-extended

bench: $(STAMP)
	$(BIN)/shadowgate bench speed

clean:
	rm -rf $(VENV) .pytest_cache
