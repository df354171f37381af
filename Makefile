# Developer entry points. On a fresh Debian machine `make run` and `make test`
# are all a newcomer needs; every step below is skipped when already done.
#
# The package is installed editable into .venv without build isolation and
# with a persistent CMake build directory (build/<wheel tag>): Python edits
# are live at once, and a change to any C file or to the build files makes
# the install stamp stale, so the next `make setup` (and so `make test`,
# `make run`, ...) re-runs the install, which is an incremental CMake build.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
EDGE_SLM := $(VENV)/bin/edge-slm
STAMPS := build/stamps
ARCH := $(shell uname -m)

# mosquitto: the broker `edge-slm serve` starts when given none, and every
# MQTT test's; its clients for the pasteable example; libmosquitto-dev for the
# C client in firmware_bridge/examples; chromium for the kiosk's browser tests
# (driven by Playwright's Python package, which never downloads a browser here).
APT_PACKAGES := build-essential python3-dev python3-venv \
	mosquitto mosquitto-clients libmosquitto-dev chromium
# The NEON kernels are checked on x86 development machines through a cross
# compiler and qemu; on an ARM board they run natively.
ifeq ($(ARCH),x86_64)
APT_PACKAGES += gcc-aarch64-linux-gnu qemu-user-static
endif
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Everything the extension is built from (the C tests have their own Makefile).
CORE_SOURCES := CMakeLists.txt pyproject.toml \
	$(shell find kernels -path kernels/tests -prune -o -name '*.[ch]' -print)

# The peer for `make bench`. Pinned so pip's wheel cache serves the one build.
# The default native build of llama.cpp enables AMX and crashes on the first
# decode on the x86 development VMs, so x86-64 gets an explicit AVX2 build.
LLAMA_CPP_PYTHON := llama-cpp-python[server]==0.3.36
ifeq ($(ARCH),x86_64)
PEER_ENV := CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
endif

.PHONY: setup model run test test-slow test-backends bench bench-serve soak soak-serve arm64 clean distclean

setup: $(STAMPS)/apt $(STAMPS)/install model

# System packages, installed only when one is missing; checked again when
# this file changes, in case the list did.
$(STAMPS)/apt: Makefile
	@set -e; \
	missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -qx 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install" $$missing; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@mkdir -p $(@D) && touch $@

# pyvenv.cfg, not bin/python: the latter is a symlink whose mtime is the
# interpreter's, which would make a recreated venv look older than the stamps.
$(VENV)/pyvenv.cfg: | $(STAMPS)/apt
	$(PYTHON) -m venv $(VENV)

# What --no-build-isolation needs in the venv.
$(STAMPS)/build-deps: $(VENV)/pyvenv.cfg
	$(PIP) install -q 'scikit-build-core>=0.10' cmake ninja
	@mkdir -p $(@D) && touch $@

$(STAMPS)/install: $(STAMPS)/build-deps $(CORE_SOURCES)
	$(PIP) install -q --no-build-isolation --config-settings=build-dir='build/{wheel_tag}' -e '.[test]'
	@touch $@

# The reference model (see edge_slm/pull.py). No stamp: pull checks the file
# in place against its sha256 (a fraction of a second) and fetches it again
# only if it is missing or damaged.
model: $(STAMPS)/install
	$(EDGE_SLM) pull

# The main job: a private mosquitto, the service on it, one question asked
# through the broker as a device would; then it keeps serving (Ctrl-C stops).
run: setup
	$(EDGE_SLM) serve --demo

test: setup
	$(MAKE) -j2 -C kernels/tests all
	$(PY) -m pytest -m "not slow and not backends" tests/

test-slow: setup
	$(PY) -m pytest -m slow tests/

# The reference model exported to ONNX and LiteRT and run beside our C
# kernels. The LiteRT export needs PyTorch and Google's converter, a
# development machine's tools, never the board's: torch's CPU build first,
# so that litert-torch does not pull a CUDA one.
test-backends: setup $(STAMPS)/export-litert
	$(PY) -m pytest -m backends tests/

# litert-torch's xdsl asks for typing-extensions < 4.13, which llama.cpp's
# server (pydantic) cannot import with; the converter runs with the newer one.
$(STAMPS)/export-litert: $(STAMPS)/install
	$(PIP) install -q 'torch==2.13.0'
	$(PIP) install -q 'litert-torch==0.10.*'
	$(PIP) install -q 'typing-extensions>=4.14'
	@touch $@

$(STAMPS)/peer: $(STAMPS)/build-deps
	$(PEER_ENV) $(PIP) install '$(LLAMA_CPP_PYTHON)'
	@touch $@

bench: setup $(STAMPS)/peer
	$(EDGE_SLM) bench --json bench.json

soak: setup
	$(EDGE_SLM) soak --memory-budget 256M --slots 1,2,4 --requests 2000 --json soak.json

# The MQTT service through a private broker beside llama.cpp's HTTP server
# and the engine alone, at 1, 2 and 4 slots; then 2,000 questions through the
# broker with malformed, oversized, expired and cancelled ones mixed in.
bench-serve: setup $(STAMPS)/peer
	$(PY) -m firmware_bridge.bench_serve --slots 1,2,4 --json bench-serve.json

soak-serve: setup
	$(PY) -m firmware_bridge.bench_serve soak --questions 2000 --memory-budget 256M --json soak-serve.json

arm64: setup
	bash scripts/check-arm64.sh

# Keeps .venv (it holds the slow-to-build peer); `make distclean` removes it.
clean:
	if [ -f kernels/tests/Makefile ]; then $(MAKE) -C kernels/tests clean; fi
	rm -rf build dist .pytest_cache .hypothesis bench.json soak.json bench-serve.json soak-serve.json \
		edge_slm/_core*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
