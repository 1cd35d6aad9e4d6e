# Two entry points for a fresh clone: `make demo` (the main job) and `make test`. Each installs what it
# needs into .venv first. torch goes in before anything that depends on it: on a machine without a GPU
# that picks the CPU wheel (a bare `pip install lightning` would pull a multi-GB CUDA build). On a GPU
# machine run `make TORCH=torch demo` to let pip choose.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Nothing here may reach the Hugging Face Hub: models and data are local.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export JSONARGPARSE_DEPRECATION_WARNINGS := off

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/eaft-pl fit --config configs/quickstart/base.yaml --config configs/quickstart/sft.yaml
	$(BIN)/eaft-pl fit --config configs/quickstart/base.yaml --config configs/quickstart/eaft.yaml
	$(BIN)/python scripts/show_runs.py --experiment quickstart --limit 2

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) outputs mlruns
