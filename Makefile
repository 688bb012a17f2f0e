# The README's two commands. Both are idempotent: the virtual environment is
# (re)installed only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: demo tour test docs bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The native CPU kernels (csrc/) are compiled by the install: rebuilt when a source changes.
NATIVE := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.txt csrc/kernels/*)

$(VENV)/.installed-demo: pyproject.toml $(NATIVE) | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(NATIVE) | $(PY)
	$(PIP) install -q -e '.[test]'
	touch $@

$(VENV)/.installed-docs: pyproject.toml $(NATIVE) | $(PY)
	$(PIP) install -q -e '.[docs]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) examples/train_addition.py

tour: $(VENV)/.installed-demo
	$(PY) examples/tour.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The documentation site into site/ (open site/index.html); warnings are errors.
docs: $(VENV)/.installed-docs
	$(PY) tools/docs.py html

bench: $(VENV)/.installed-demo
	$(PY) benchmarks/blas.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/ternary.py
	$(PY) benchmarks/cpu_kernels.py --rounds 2
	$(PY) benchmarks/train.py
	$(PY) benchmarks/grad_checkpoint.py
	$(PY) benchmarks/kernels.py
	$(PIP) install -q -e '.[bench,lm]' && $(PY) benchmarks/generate.py --quick && $(PY) benchmarks/speculative.py --quick && $(PY) benchmarks/finetune.py --quick

clean:
	rm -rf $(VENV) build dist site *.egg-info
