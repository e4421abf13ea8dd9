# Set-up and everyday commands. PROFILE=auto picks gpu when nvidia-smi sees a GPU, else cpu.
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= auto
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU ?= torch==2.13.0
SGLANG ?= sglang==0.5.23
SERVE_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

ifeq ($(PROFILE),auto)
  PROFILE := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
endif

.PHONY: install install-cpu install-gpu serve test test-slow bench lock-cpu

install: $(VENV)/.installed-$(PROFILE)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# CPU profile: CPU torch, sglang without dependency resolution, an exact list of its non-CUDA
# dependencies, then our patches (torchvision import guard, sgl_kernel compat module).
$(VENV)/.installed-cpu: $(VENV)/bin/python requirements/cpu.txt pyproject.toml patches/apply.py
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -r requirements/cpu.txt -c requirements/torch-cpu.txt
	$(PIP) install -q --no-deps $(SGLANG)
	$(PIP) install -q --no-deps -e .
	$(PIP) install -q ruff==0.17.6 pytest-xdist==3.8.0 execnet==2.1.2
	$(PY) patches/apply.py
	touch $@

# GPU profile: sglang with its own dependency set (FlashInfer, CUDA torch).
$(VENV)/.installed-gpu: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q -e '.[gpu,convert,test]'
	touch $@

serve: install
	$(PY) -m sglang_shplb.launch_server $(SERVE_ARGS)

# Two workers, one per core, each with one OpenMP thread like the servers it starts (two-thread torch in two
# workers oversubscribes the cores); a test file stays on one worker, so its servers start once (--dist loadfile),
# and the longest files start first (tests/conftest.py: LONGEST_FIRST).
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	--durations=25
test: install
	$(PYTEST) $(PYTEST_ARGS)

# Serial: its interpreter and compile checks have fixed time limits sized for the whole machine.
test-slow: install
	$(PY) -m pytest -q --durations=25 -m slow $(PYTEST_ARGS)

# The report: re-runs what is stale at HEAD, writes benchmark/results/SUMMARY.md (BENCH_ARGS: --only quality, --no-run)
bench: install
	OMP_NUM_THREADS=1 $(PY) benchmark/report.py $(BENCH_ARGS)

# Regenerate requirements/cpu.txt from requirements/cpu-sglang-deps.in in a scratch venv.
lock-cpu:
	rm -rf /tmp/shplb-lock && $(PYTHON) -m venv /tmp/shplb-lock
	/tmp/shplb-lock/bin/pip install -q $(TORCH_CPU) && /tmp/shplb-lock/bin/pip install -q -r requirements/cpu-sglang-deps.in -c requirements/torch-cpu.txt
	(head -2 requirements/cpu.txt; /tmp/shplb-lock/bin/pip freeze | grep -viE '^(torch==|-e |sglang)') > requirements/cpu.txt.new && mv requirements/cpu.txt.new requirements/cpu.txt
