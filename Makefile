# Two commands a fresh machine needs: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this project tests against.
TORCH_PIN ?= torch==2.13.0
export GLOO_SOCKET_IFNAME ?= lo
export PYTHONUNBUFFERED := 1
export OMP_NUM_THREADS ?= 1
# torch warns once per process when NumPy is absent; avgfn does not need NumPy.
export PYTHONWARNINGS ?= ignore:Failed to initialize NumPy

.PHONY: test demo docs venv clean

venv: $(VENV)/.installed

# The [torchft] extra (tests/test_torchft.py): torchft 0.2 asks for torch>=2.7, which the CPU
# torch installed first satisfies, so pip keeps that build and pulls no CUDA one.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test,docs,demo,torchft]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q
	$(PY) -m mypy
	$(MAKE) --no-print-directory docs

# The documentation site, built from docs/ and the docstrings; fails on any warning and on
# what a reader would see as broken (tools/check_site.py). Open site/index.html from disk.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site
	$(PY) tools/check_site.py site

# The convergence study: 8 simulated workers per algorithm, then a real 4-process check.
demo: $(VENV)/.installed
	$(PY) -m avgfn.demo

clean:
	rm -rf $(VENV) build *.egg-info
