# `make train`: set up .venv and run the default experiment (ProtoNet, Omniglot, lake split).
# `make test`:  set up .venv and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch; override for a CUDA machine, e.g. make TORCH="torch" train
TORCH  ?= torch==2.13.0

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,rl,export]"
	touch $@

train: setup
	$(BIN)/metamap train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
