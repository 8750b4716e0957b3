# `make train`: set up .venv (the package alone) and run the quickstart (configs/quickstart.toml: ProtoNet, Omniglot, lake split).
# `make test`:  set up .venv with the test, rl and export extras and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch; override for a CUDA machine, e.g. make TORCH="torch" train
TORCH  ?= torch==2.13.0

.PHONY: setup setup-test train test bench clean

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-extras

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

# The quickstart needs none of these (MuJoCo, onnxruntime and pytest are the bulk of the downloads).
$(VENV)/.installed-extras: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test,rl,export]"
	touch $@

train: setup
	$(BIN)/metamap train configs/quickstart.toml $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
