# netwatch: one entry point per thing a person wants to do on a fresh machine.
#   make demo   - create the venv, install, run the demo on loopback
#   make test   - install Debian test tools + venv, then lint, type-check and run every test
#   make install - as root: netwatch in its own venv under PREFIX, a systemd unit (docs/install.md)
#   make mutation - mutation testing of the proxy and the state machines (outside CI, hours)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := mosquitto mosquitto-clients prometheus prometheus-alertmanager \
	prometheus-blackbox-exporter nftables iproute2 nginx-light victoria-metrics chromium systemd \
	faketime strace
BENCH_APT_PACKAGES := wrk
PYTEST_ARGS ?=
# make install: where netwatch goes (deploy/install.sh says what each one is for).
PREFIX ?= /opt/netwatch
SYSCONFDIR ?= /etc/netwatch
UNITDIR ?= /etc/systemd/system
BINDIR ?= /usr/local/bin
SYSTEMD ?= auto

.PHONY: venv deps demo test test-asyncio unit-asyncio lint typecheck unit bench mutation clean install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests talk to (real Mosquitto, Prometheus, promtool, amtool, nft).
# Installed only when missing, and only where apt-get and root are available.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "missing Debian packages:$$missing (install them as root; the tests that need them will skip)"; \
		fi; \
	fi

demo: venv
	$(BIN)/netwatch demo --duration 60

lint: venv
	$(BIN)/ruff check netwatch probes tests bench
	$(BIN)/ruff format --check netwatch probes tests bench

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test: deps venv lint typecheck unit unit-asyncio

# The tests run on the loop netwatch picks (uvloop on Linux). These run again on the standard
# asyncio loop: the modules that drive sockets and the loop directly (about a minute).
# `make test-asyncio ASYNCIO_PYTEST_ARGS=` runs the whole suite on it.
ASYNCIO_PYTEST_ARGS ?= -q tests/test_probes.py tests/test_path.py tests/test_relay.py \
	tests/test_upstream_client.py tests/test_httpd.py tests/test_proxy_forward_once.py \
	tests/test_slow_clients.py tests/test_monitor.py tests/test_mqtt.py tests/test_loop.py
unit-asyncio: venv
	NETWATCH_LOOP=asyncio $(BIN)/pytest $(ASYNCIO_PYTEST_ARGS)

test-asyncio: deps unit-asyncio

# Benchmarks print their figures; see bench/README.md. Each takes minutes.
bench: deps venv
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_APT_PACKAGES) >/dev/null; }
	$(BIN)/python bench/probe_cost.py
	$(BIN)/python bench/proxy_overhead.py
	$(BIN)/python bench/enqueue_http.py
	$(BIN)/python bench/enqueue.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/mqtt_latency.py
	$(BIN)/python bench/city.py

install:
	PREFIX="$(PREFIX)" SYSCONFDIR="$(SYSCONFDIR)" UNITDIR="$(UNITDIR)" BINDIR="$(BINDIR)" \
		SYSTEMD="$(SYSTEMD)" PYTHON="$(PYTHON)" bash deploy/install.sh

# Mutation testing, outside CI: mutmut (config in pyproject.toml, [tool.mutmut]) mutates the
# proxy and the link and mode machines and runs the tests covering each mutant; it lists the
# survivors at the end. MUTATE narrows it, e.g. make mutation MUTATE="'netwatch.monitor.link*'".
# Bounded by MUTATION_TIMEOUT seconds; an interrupted run resumes where it stopped.
MUTATE ?= 'netwatch.monitor.link*' 'netwatch.proxy.*'
MUTATION_TIMEOUT ?= 14400
mutation: deps venv
	$(BIN)/pip install --quiet -e '.[dev,mutation]'
	timeout $(MUTATION_TIMEOUT) $(BIN)/mutmut run --max-children 2 $(MUTATE) || true
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants
