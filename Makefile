# The two commands a newcomer needs: `make run` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-unit lint bench clean

install: $(STAMP)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,embedded,dev,otel]'
	touch $(STAMP)

run: install
	RAG_LOG_FORMAT=$${RAG_LOG_FORMAT:-console} RAG_DOCS=$${RAG_DOCS:-true} $(BIN)/rag-serve --ingest-examples --local-key

# The dashboard test drives Debian's chromium (headless); install it once if missing (root on CI).
test: install
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; the dashboard browser test will fail"
	@command -v docker-compose >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) || echo "warning: could not install docker-compose; tests/system/test_compose.py will fail"
	$(BIN)/pytest -q

# The fast part alone: pure tests, no servers, no model (tests/unit, marked `unit`).
test-unit: install
	$(BIN)/pytest -q -m unit tests/unit

lint: install
	$(BIN)/ruff check service ingest tests bench
	$(BIN)/ruff format --check service ingest tests bench
	$(BIN)/mypy

# Each benchmark runs the project and its reference side by side and writes docs/benchmarks.md.
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.retrieval
	$(BIN)/python -m bench.hit_path
	$(BIN)/python -m bench.miss_overhead
	$(BIN)/python -m bench.semantic_judge
	$(BIN)/python -m bench.conversations
	$(BIN)/python -m bench.workload
	$(BIN)/python -m bench.stampede
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.fault_timeline

clean:
	rm -rf $(VENV) .ragcache .pytest_cache .mypy_cache .ruff_cache
