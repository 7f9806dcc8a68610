# `make run` and `make test` each create .venv when missing, install into it, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp is keyed on setup.py: editing dependencies reinstalls, otherwise install is skipped.
STAMP := $(VENV)/.installed-$(shell sha1sum setup.py Makefile | sha1sum | cut -c1-12)

# CPU defaults: no accelerator probing, JIT-built DeepSpeed ops cached inside the repo,
# Ray kept on loopback.
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: install run demo-meta test test-fast bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this version is a CPU build on local disk; anything else pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	# DeepSpeed ships only an sdist whose build imports torch.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-cache-dir --no-build-isolation 'deepspeed>=0.15,<0.20'
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(BIN)/trellis pipeline --config launcher/configs/pipeline.yaml

# GPT-2/GPT-3 meta-learning: in-context k-shot vs fine-tuning on held-out tasks (CPU, < 15 min).
demo-meta: install
	$(BIN)/trellis meta --config launcher/configs/meta.yaml

test: install
	$(BIN)/python -m pytest -q tests

# Unit tests only: no Ray, no DeepSpeed engines or process groups, no whole jobs (< 60 s).
test-fast: install
	$(BIN)/python -m pytest -q -m "not integration" tests

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf build runs
