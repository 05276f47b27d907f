# Waymark: `make demo` and `make test` set up everything they need on Debian 12 (as root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# qemu-utils: qemu-img/qemu-io; qemu-system-x86: VMs; the rest build the test guest
APT_PACKAGES := qemu-utils qemu-system-x86 python3-venv

.PHONY: demo test lint check bench deps clean

deps: $(STAMP)

# Debian packages: installed only when a program is missing.
.apt-stamp:
	@missing=""; \
	command -v qemu-img >/dev/null || missing="$$missing qemu-utils"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(STAMP): pyproject.toml .apt-stamp
	/usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: deps
	./scripts/demo.sh

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test: deps lint
	$(VENV)/bin/pytest

bench: deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .apt-stamp .pytest_cache .mypy_cache .ruff_cache .hypothesis
