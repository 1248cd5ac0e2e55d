# titans-mini: `make lab` to learn, `make test` to check everything, `make gpu-check` on a GPU.
#
# `make venv` (run by the others) creates .venv the first time and reinstalls when
# pyproject.toml or constraints-cpu.txt changes:
#   - GPU present (nvidia-smi works) or your python already has torch (Colab, conda):
#     the venv sees your site-packages and keeps your torch;
#   - otherwise (CPU only): torch's CPU build, pinned by constraints-cpu.txt, so pip
#     never pulls the multi-GB CUDA packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.titans-mini-installed
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_NB := --nbval-lax --nbval-cell-timeout=600

.PHONY: venv lab test gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@set -e; \
	if nvidia-smi >/dev/null 2>&1 || $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "make venv: GPU or an installed torch found: keeping your torch"; \
		[ -x $(BIN)/python ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
		$(BIN)/python -m pip install -e ".[dev,hf]"; \
	else \
		echo "make venv: CPU only: torch's CPU build (constraints-cpu.txt)"; \
		[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
		if ! $(BIN)/python -c "import torch" >/dev/null 2>&1 && \
		   $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5)" >/dev/null 2>&1; then \
			$(BIN)/python -m pip install -c constraints-cpu.txt torch --extra-index-url $(TORCH_CPU_INDEX); \
		fi; \
		$(BIN)/python -m pip install -c constraints-cpu.txt -e ".[dev,hf]"; \
	fi
	@touch $(STAMP)

lab: venv
	$(BIN)/jupyter lab notebooks/

# Unit tests and every notebook (re-executed in a fresh kernel) in one pytest run.
test: venv
	$(BIN)/python -m pytest tests $(wildcard notebooks) $(PYTEST_NB)

gpu-check: venv
	bash .ci/gpu-check
