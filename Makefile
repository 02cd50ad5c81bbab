# The two commands a new user types: `make run` and `make test`. Both create (or reuse) a virtualenv and install
# torch==2.13.0 before anything else, so no multi-GB CUDA build of torch is pulled on a CPU machine.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install run test test-slow test-gpu lint format clean bench-venv chromium

install: $(STAMP)

# DeepSpeed ships as an sdist whose setup.py imports torch: it is built against the torch installed just before
# (no build isolation, which would download a CUDA torch), and its ops compile lazily on first use.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(STAMP)
	$(BIN)/gptline run $(ARGS)
	@echo "Open the report above in a browser. Talk to the RLHF model:   $(BIN)/gptline chat ppo"
	@echo "(or: $(BIN)/gptline chat sft; $(BIN)/gptline sample pretrain \"Once upon\")"

test: $(STAMP) chromium
	$(BIN)/pytest -q --durations=15

# Fault injection and longer end-to-end runs (CI runs these too).
test-slow: $(STAMP) chromium
	$(BIN)/pytest -q -m slow --durations=25; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests collected"; exit 0; fi; exit $$rc

# bf16, NCCL, SDPA's flash path and the KV-cache sampler on CUDA; every test skips where there is no GPU.
test-gpu: $(STAMP)
	$(BIN)/pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# TRL 1.12.0 (the last release with PPOTrainer; it has GRPOTrainer too) for `python -m bench.ppo` and `bench.grpo`
# only, kept out of the project's venv. GRPOTrainer imports its vLLM client, which needs requests.
bench-venv:
	test -x .venv-trl/bin/python || $(PYTHON) -m venv .venv-trl
	.venv-trl/bin/pip install -q torch==2.13.0
	.venv-trl/bin/pip install -q trl==1.12.0 requests==2.32.3

# Headless Chromium for the report's screenshot tests: Debian's package (root or sudo). Without it those tests skip,
# unless GPTLINE_REQUIRE_CHROMIUM is set (CI sets it).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; } || \
	  echo "note: could not install chromium; the report screenshot tests will skip"; }

clean:
	rm -rf $(VENV) .venv-trl store .pytest_cache .ruff_cache
