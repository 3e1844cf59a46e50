# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-deps clean

# torch is pinned for this environment: 2.13.0 is a CPU build on this machine's disk,
# so the install never pulls a multi-GB CUDA build. The package itself allows a wide range.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[data,dev,hf]'
	@# builtin:fashion-mnist reads Debian's dataset-fashion-mnist package: installed here when
	@# this runs as root with apt and the package is missing; otherwise skipped silently.
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	   && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || echo "note: apt-get could not install dataset-fashion-mnist (builtin:fashion-mnist)"; \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/slimkit demo --out demo-out --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

# Benchmarks' peer packages, installed on demand only (make bench-deps).
bench-deps: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[data,dev,hf,bench]'

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
