# titans-mini: `make lab` to learn, `make test` to check everything, `make gpu-check` on a GPU.
#
# `make venv` (run by the others) creates .venv the first time and reinstalls when
# pyproject.toml, constraints-cpu.txt or requirements-lock.txt changes:
#   - GPU present (nvidia-smi works) or your python already has torch (Colab, conda):
#     the venv sees your site-packages and keeps your torch and your versions;
#   - otherwise (CPU only): torch's CPU build (constraints-cpu.txt), so pip never pulls the
#     multi-GB CUDA packages, and every other package at the version we tested
#     (requirements-lock.txt), when your Python is the one the lock was made for. On another
#     Python it says so and installs the newest versions pyproject.toml allows.
# `make lock` remakes requirements-lock.txt (uv pip compile); `make test-latest` runs the tests
# in .venv-latest with the newest versions pyproject.toml allows, without the lock.

PYTHON ?= python3
VENV := .venv
LATEST := .venv-latest
LOCK := requirements-lock.txt
LOCK_PYTHON := 3.11
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCKED := $(if $(filter $(LOCK_PYTHON),$(PY_VERSION)),-c $(LOCK))
PYTEST_NB := --nbval-lax --nbval-cell-timeout=600
TESTS = tests $(wildcard notebooks) $(PYTEST_NB)

.PHONY: venv lab student site browser-test test test-latest lock gpu-check

# $(call install,VENV,CPU PIP OPTIONS): create VENV and install titans-mini with its dev and hf extras.
define install
	@set -e; \
	if nvidia-smi >/dev/null 2>&1 || $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "make: GPU or an installed torch found: keeping your torch and your versions"; \
		[ -x $(1)/bin/python ] || $(PYTHON) -m venv --system-site-packages $(1); \
		$(1)/bin/python -m pip install -e ".[dev,hf]"; \
	else \
		echo "make: CPU only: torch's CPU build (constraints-cpu.txt)"; \
		[ -x $(1)/bin/python ] || $(PYTHON) -m venv $(1); \
		if ! $(1)/bin/python -c "import torch" >/dev/null 2>&1 && \
		   $(1)/bin/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5)" >/dev/null 2>&1; then \
			$(1)/bin/python -m pip install -c constraints-cpu.txt torch --extra-index-url $(TORCH_CPU_INDEX); \
		fi; \
		$(1)/bin/python -m pip install -c constraints-cpu.txt $(2) -e ".[dev,hf]"; \
	fi
endef

venv: $(VENV)/.titans-mini-installed

$(VENV)/.titans-mini-installed: pyproject.toml constraints-cpu.txt $(LOCK)
	$(if $(LOCKED),,@echo "make: $(LOCK) was made for Python $(LOCK_PYTHON), this is $(PY_VERSION):" \
		"installing the newest versions pyproject.toml allows (not the tested set)")
	$(call install,$(VENV),$(LOCKED))
	@touch $@

# Your own copy of the notebooks, in my-notebooks/ (git ignores it): the committed ones stay
# clean, so `git pull` never conflicts with your edits. A notebook missing there (the first
# time, a new one, or one you deleted to start over) is copied fresh; yours are never
# overwritten. The settings turn off JupyterLab's news pop-up and update check.
LAB_DIR := my-notebooks
lab: venv
	@mkdir -p $(LAB_DIR) $(VENV)/share/jupyter/lab/settings
	@for f in notebooks/*.ipynb notebooks/README.md; do \
		[ -e $(LAB_DIR)/$${f##*/} ] || { cp $$f $(LAB_DIR)/ && echo "make lab: copied $$f to $(LAB_DIR)/"; }; done
	@cp .ci/lab-overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	$(VENV)/bin/jupyter lab $(LAB_DIR)/

# The student edition, for a course: build/student/ holds the notebooks without solutions
# and with the exercises' outputs cleared (cells chosen by their tags; see .ci/student-edition).
student: venv
	$(VENV)/bin/python .ci/student-edition build/student

# A static site of the executed notebooks for a course page: build/site/index.html (nbconvert;
# see .ci/build-site for what the pages load when viewed).
site: venv
	$(VENV)/bin/python .ci/build-site build/site

# JupyterLab in a real browser (Debian's Chromium, driven by Playwright): every notebook with a
# widget is run, its slider dragged and its plot checked; then the site's first page. Screenshots
# in build/browser-test/ (see .ci/browser-test). Needs `apt-get install chromium`; nothing else
# is downloaded (no `playwright install`).
browser-test: venv
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$CHROMIUM" ] || \
		{ echo "make browser-test: needs Chromium: sudo apt-get install chromium (or set CHROMIUM=/path/to/it)"; exit 1; }
	$(VENV)/bin/python -m pip install -q -c constraints-cpu.txt $(LOCKED) -e ".[browser]"
	$(VENV)/bin/python .ci/build-site build/site >/dev/null
	$(VENV)/bin/python .ci/browser-test build/browser-test

# Unit tests and every notebook (re-executed in a fresh kernel) in one pytest run.
test: venv
	$(VENV)/bin/python -m pytest $(TESTS)

# The same tests against the newest releases pyproject.toml allows (a new venv, no lock):
# what a learner's `pip install` gets today. Run weekly by .github/workflows/latest.yml.
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),)
	@$(LATEST)/bin/python -c "from importlib.metadata import version as v; \
		print('test-latest:', ', '.join(f'{p} {v(p)}' for p in \
		('torch', 'transformers', 'trl', 'datasets', 'accelerate', 'tokenizers', 'numpy', 'nbval', 'pytest')))"
	$(LATEST)/bin/python -m pytest $(TESTS)

# Remake the lock from pyproject.toml's ranges: the newest versions today, for Python $(LOCK_PYTHON),
# torch left to constraints-cpu.txt (CPU) or to you (GPU). Then `make test` and commit it.
lock:
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra hf --extra browser --python-version $(LOCK_PYTHON) \
		-c constraints-cpu.txt --no-emit-package torch --no-header --output-file $(LOCK) \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match)
	@sed -i '1i # The versions `make test` installs on a CPU-only machine with Python $(LOCK_PYTHON) (torch: constraints-cpu.txt).\n# Made by `make lock` (uv pip compile of pyproject.toml, extras dev and hf); used as pip constraints.' $(LOCK)

gpu-check: venv
	bash .ci/gpu-check
