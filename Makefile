# kestrel: `make demo` and `make test` do all set-up on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev musl-tools make cpio zstd e2fsprogs \
	qemu-system-x86 busybox-static caddy iproute2 util-linux curl lz4 \
	containerd golang-github-containerd-containerd-dev golang-github-containerd-ttrpc-dev \
	protobuf-compiler
export KESTREL_KERNEL_DIR ?= $(CURDIR)/.cache/kernel
# QEMU's vsock backend (rust-vmm, vhost-user). Pinned; --locked uses the crate's
# own Cargo.lock. volar finds it here (after $$KESTREL_VHOST_VSOCK and PATH).
VHOST_VSOCK_VERSION := 0.3.0
VHOST_VSOCK_ROOT := .cache/vhost-device-vsock
VHOST_VSOCK := $(VHOST_VSOCK_ROOT)/bin/vhost-device-vsock

.PHONY: setup apt venv kernel vhost-device-vsock lint test test-fast vm-test demo bench fuzz clean shim-proto

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

# Skipped when present (here or at $$KESTREL_VHOST_VSOCK). 0.3.0 needs its default
# features to build; volar runs it with uds-path only, never forward-cid.
vhost-device-vsock:
	@if [ -n "$$KESTREL_VHOST_VSOCK" ] && [ -x "$$KESTREL_VHOST_VSOCK" ]; then exit 0; fi; \
	if [ -x $(VHOST_VSOCK) ]; then exit 0; fi; \
	command -v cargo >/dev/null || { echo "vhost-device-vsock: cargo not found (install Rust: https://rustup.rs)"; exit 1; }; \
	echo "vhost-device-vsock: cargo install $(VHOST_VSOCK_VERSION) into $(VHOST_VSOCK_ROOT)"; \
	cargo install --locked --version $(VHOST_VSOCK_VERSION) --root $(VHOST_VSOCK_ROOT) vhost-device-vsock

lint: venv
	$(VENV)/bin/ruff check kestrel builder host tests vm-tests bench
	$(VENV)/bin/mypy

test-fast: setup
	$(VENV)/bin/pytest -q tests

vm-test: kernel vhost-device-vsock
	$(VENV)/bin/pytest -q vm-tests

test: setup kernel vhost-device-vsock lint
	$(VENV)/bin/pytest -q tests vm-tests

demo: kernel vhost-device-vsock
	$(PY) examples/caddy/demo.py

bench: kernel vhost-device-vsock
	$(PY) -m bench

fuzz: setup
	HYPOTHESIS_PROFILE=long $(VENV)/bin/pytest -q tests -k fuzz

# The containerd shim's protobuf code, checked in: regenerate from Debian's .proto
# files with protoc 3.21.12 (protobuf-compiler) and the pinned mypy-protobuf.
shim-proto: setup
	$(VENV)/bin/pip install -q 'mypy-protobuf==3.4.0'
	$(PY) host/containerd/genproto.py

clean:
	rm -rf $(VENV) .cache
