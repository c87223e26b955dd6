# Two commands do everything on a fresh CPU machine:
#   make demo   serve a locally built Qwen2.5-Omni with the plugin, send bigbuckbunny with sound
#   make test   the test suite (real vLLM on CPU)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenzip-ready

.PHONY: setup demo test lint bench-methods

$(STAMP): pyproject.toml scripts/setup_cpu.sh scripts/setup_deploy_tools.sh
	bash scripts/setup_cpu.sh $(VENV)
	bash scripts/setup_deploy_tools.sh $(VENV)
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokenzip demo

# pytest exits 5 when it collects no test; say so and fail rather than pass silently.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench-methods: $(STAMP)
	$(PY) benchmarks/bench_methods.py --threads 1
