# Tether — `make help` lists the targets.
#
# A newcomer needs two commands: `make run` (Tether in front of a simulated fleet) and
# `make test` (the whole suite). Both install what a fresh machine lacks first.

SHELL := /bin/bash
CARGO ?= cargo
CONFIG ?= conf/tether.yaml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The official Python SDKs the e2e tests drive Tether with (tests/e2e/sdk.rs finds them here),
# in a virtualenv so that nothing touches the system's Python.
SDK_VENV := target/sdk-venv
SDK_REQUIREMENTS := tests/sdk/requirements.txt

.PHONY: help deps build run run-multi test e2e-engines lint fmt check-conf bench bench-deps bench-quick clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

deps: ## Install what is missing: cmake (Pingora's zlib-ng), redis-server (the sticky store's tests, run-multi), the Python SDKs (e2e)
	@command -v cmake >/dev/null || { echo "installing cmake"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake >/dev/null; }
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { echo "installing redis-server"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@command -v cc >/dev/null || { echo "installing a C compiler"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq build-essential >/dev/null; }
	@# Debian's python3 makes virtualenvs only with python3-venv (which brings ensurepip).
	@python3 -c 'import ensurepip' 2>/dev/null || { echo "installing python3-venv"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }
	@# Reinstalled when the pins change or the venv no longer finds them (its python moved, say).
	@$(SDK_VENV)/bin/python -c 'import importlib.util as u; assert u.find_spec("openai") and u.find_spec("anthropic")' 2>/dev/null \
		&& cmp -s $(SDK_REQUIREMENTS) $(SDK_VENV)/requirements.txt || { \
		echo "installing the openai and anthropic SDKs into $(SDK_VENV)"; \
		{ $(SDK_VENV)/bin/python -m pip --version >/dev/null 2>&1 || python3 -m venv --clear $(SDK_VENV); } && \
		$(SDK_VENV)/bin/python -m pip install -q -r $(SDK_REQUIREMENTS) && cp $(SDK_REQUIREMENTS) $(SDK_VENV)/requirements.txt; }

build: deps ## Build every binary (debug)
	$(CARGO) build --workspace --bins

run: build ## Start a simulated 2-region fleet and Tether on 127.0.0.1:8080 (Ctrl-C stops both)
	@./target/debug/replica-sim --topology $(CONFIG) --admin 127.0.0.1:9300 > /dev/null & sim=$$!; \
	trap 'kill $$sim 2>/dev/null; wait $$sim 2>/dev/null' EXIT; \
	trap 'exit 0' INT TERM; \
	echo "replica-sim (pid $$sim) serving the fleet of $(CONFIG); its admin API is on 127.0.0.1:9300"; \
	./target/debug/tether run -c $(CONFIG)

run-multi: build ## A two-instance tier: Redis, the simulated fleet, Tether for eu on :8080 and for us on :8081 (Ctrl-C stops all)
	@redis-server --port 6390 --bind 127.0.0.1 --save '' --appendonly no > /dev/null & redis=$$!; \
	./target/debug/replica-sim --topology conf/tier-eu.yaml --admin 127.0.0.1:9300 > /dev/null & sim=$$!; \
	./target/debug/tether run -c conf/tier-eu.yaml & eu=$$!; \
	./target/debug/tether run -c conf/tier-us.yaml & us=$$!; \
	trap 'kill $$eu $$us $$sim $$redis 2>/dev/null; wait 2>/dev/null' EXIT; \
	trap 'exit 0' INT TERM; \
	echo "redis-server (pid $$redis) on 127.0.0.1:6390, replica-sim (pid $$sim) admin on 127.0.0.1:9300,"; \
	echo "tether eu (pid $$eu) on 127.0.0.1:8080, tether us (pid $$us) on 127.0.0.1:8081; README: 'A tier on one machine'"; \
	wait

test: deps lint ## Lints, every test, and `tether check` on every shipped config
	@# The e2e tests run the tether and replica-sim binaries: build them first (cargo test
	@# only builds the binaries of the package under test).
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace
	$(MAKE) --no-print-directory check-conf

e2e-engines: deps ## Opt-in, not in `test`: three real llama.cpp servers behind Tether (builds llama-server once)
	scripts/e2e-engines.sh

lint: ## rustfmt and clippy (warnings are errors)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

check-conf: ## Validate every config in conf/
	$(CARGO) run -q -p tether -- check $(addprefix -c ,$(wildcard conf/*.yaml))

bench-deps: deps ## Install what the benchmarks compare against or use: nginx, haproxy, wrk, valgrind (redis-server: deps)
	@missing=""; for p in nginx:nginx haproxy:haproxy wrk:wrk valgrind:valgrind; do \
		command -v $${p%%:*} >/dev/null || [ -x /usr/sbin/$${p%%:*} ] || missing="$$missing $${p##*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

bench: bench-deps ## Every benchmark (release, ~17 min): policies vs cache hits and an edge tier, proxy cost, routing, memory, metering
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p tether-benches

bench-quick: bench-deps ## A smoke run of the scenario benchmarks (~2.5 min): smaller workloads, one round
	$(CARGO) build --release --workspace --bins
	BENCH_QUICK=1 BENCH_NO_CALLGRIND=1 BENCH_PLOTS_DIR=$(CURDIR)/target/bench-plots $(CARGO) bench -p tether-benches --bench policies --bench proxy_cost

clean: ## Remove build output
	$(CARGO) clean
