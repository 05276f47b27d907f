# Waymark: `make demo` and `make test` set up everything they need on Debian 12 (as root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint check bench deps clean

deps: $(STAMP) .qemu-user-stamp

# Debian packages, installed only when one is missing: qemu-utils (qemu-img, qemu-io),
# qemu-system-x86 (VMs), kmod + e2fsprogs + qemu-ga's libraries (building the test guest),
# GRUB's BIOS and UEFI images + grub-mkrescue's xorriso and mtools + dosfstools (the test
# guest's boot disk and ISO), tpm2-tools (its libraries go into the test guest; the tests also
# change a TPM from the host as a guest would), ovmf (UEFI firmware), swtpm and swtpm-tools (a
# VM's TPM), chromium (the portal's browser tests, driven by Playwright), libvirt-daemon-system
# and libvirt-clients (the tests of vm import-libvirt define domains in a real libvirtd).
APT_PACKAGES := qemu-utils qemu-system-x86 python3-venv kmod e2fsprogs \
	libglib2.0-0 libnuma1 libudev1 liburing2 chromium \
	grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools dosfstools tpm2-tools ovmf \
	swtpm swtpm-tools libvirt-daemon-system libvirt-clients novnc
.apt-stamp: Makefile
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "Installing Debian packages: $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi
	@touch $@

# The unprivileged user QEMU runs as when Waymark runs as root (docs/runtime.md, "Confinement");
# Waymark also creates it on first need. Another name: WAYMARK_QEMU_USER.
QEMU_USER := $(or $(WAYMARK_QEMU_USER),waymark-qemu)
.qemu-user-stamp:
	@getent passwd $(QEMU_USER) >/dev/null || \
	  useradd --system --no-create-home --shell /usr/sbin/nologin $(QEMU_USER)
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
	$(VENV)/bin/lint-imports

# Two workers on this project's 2-core hosts, a test file at a time (--dist loadfile): a file's
# tests run in order on one worker, so its module fixtures (a booted guest, a server) are made
# once and tests that build on an earlier one's result keep working. One process: TEST_WORKERS=0.
# (Not --dist loadgroup: pytest-xdist 3.8 cannot group tests under pytest 9.2, which no longer
# reads the node id xdist rewrites.) Tests whose items share one node id (Schemathesis's cases)
# would be collapsed into one by the workers: marked single_process, they run after, in one process.
TEST_WORKERS ?= 2
test: deps lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not single_process"
	$(VENV)/bin/pytest -p no:xdist -m single_process

bench: deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .apt-stamp .qemu-user-stamp .pytest_cache .mypy_cache .ruff_cache .hypothesis
