# kestrel: `make demo` and `make test` do all set-up on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev musl-tools make cpio zstd e2fsprogs \
	qemu-system-x86 busybox-static caddy iproute2 util-linux curl lz4
export KESTREL_KERNEL_DIR ?= $(CURDIR)/.cache/kernel

.PHONY: setup apt venv kernel lint test test-fast vm-test demo bench fuzz clean

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt: installing $$missing"; \
		SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

kernel: setup
	$(VENV)/bin/volar kernel fetch

lint: venv
	$(VENV)/bin/ruff check kestrel builder host tests vm-tests bench
	$(VENV)/bin/mypy

test-fast: setup
	$(VENV)/bin/pytest -q tests

vm-test: kernel
	$(VENV)/bin/pytest -q vm-tests

test: setup kernel lint
	$(VENV)/bin/pytest -q tests vm-tests

demo: kernel
	$(PY) examples/caddy/demo.py

bench: kernel
	$(PY) -m bench

fuzz: setup
	HYPOTHESIS_PROFILE=long $(VENV)/bin/pytest -q tests -k fuzz

clean:
	rm -rf $(VENV) .cache
