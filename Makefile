# deskpush: the two commands of the Quickstart are `make serve` and `make test`.
# Both create .venv and install what they need: `make serve` the server alone,
# `make test` the test extras too, and Debian's Chromium for the browser tests
# and its redis-server and haproxy for the cluster tests when they are missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# One stamp per install: `make serve` installs what the server needs only,
# `make test` (and what runs its tools) the test extras as well.
SERVE_STAMP := $(VENV)/.serve-stamp
STAMP  := $(VENV)/.test-stamp
# Development only: `make serve` keeps its token secret and integrator key here
# (owner-only, made on first use), so open desktop tabs and printed links
# survive a restart. DESKPUSH_JWT_SECRET / DESKPUSH_API_KEY or a config win.
DEV_SECRETS := $(VENV)/deskpush-dev.env
CHROMIUM ?= /usr/bin/chromium
# Debian's paths; /usr/sbin is not on every user's PATH.
REDIS_SERVER ?= /usr/bin/redis-server
HAPROXY ?= /usr/sbin/haproxy

.PHONY: serve cluster test test-oldest chromium cluster-tools bench soak clean vocabulary

$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(SERVE_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP) $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(VENV)/bin/deskpush serve --dev-secrets $(DEV_SECRETS) $(ARGS)

# Cluster mode on one machine: Redis, three nodes and HAProxy in front on
# 127.0.0.1:8765, with the same development secrets as `make serve`; Ctrl-C
# stops them all. `make cluster ARGS="--nodes 2 --port 9000"`.
cluster: $(SERVE_STAMP) cluster-tools
	$(VENV)/bin/deskpush local-cluster --nodes 3 --dev-secrets $(DEV_SECRETS) $(ARGS)

test: $(STAMP) chromium cluster-tools
	$(PY) -c 'import websockets; print("websockets", websockets.__version__)'
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole suite again on the oldest websockets pyproject.toml allows, in a
# venv of its own (`make test` gets the newest). CI runs both.
OLDEST_VENV := .venv-oldest
WEBSOCKETS_OLDEST = $(shell sed -n 's/.*"websockets>=\([0-9.]*\)".*/\1/p' pyproject.toml)

test-oldest: chromium cluster-tools
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 'websockets==$(WEBSOCKETS_OLDEST)'
	$(OLDEST_VENV)/bin/python -c 'import websockets; print("websockets", websockets.__version__)'
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Playwright's own browser download cannot work here; the tests drive Debian's.
chromium:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

# The cluster tests and `make cluster` run Debian's redis-server and haproxy
# as plain processes of their own (deskpush.server.localcluster); the
# packages' system services are not used.
cluster-tools:
	@if [ ! -x "$(REDIS_SERVER)" ] || [ ! -x "$(HAPROXY)" ]; then \
	  echo "installing Debian's redis-server and haproxy for the cluster tests"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server haproxy >/dev/null; \
	fi

# Benchmarks against the peers: prints the table and writes bench/RESULTS.md
# (about 12 min on 2 cores), cluster mode included. Needs Node.js and npm;
# installs bench/node_modules, python-socketio + aiohttp into the venv on
# first use, and redis-server and haproxy as `make test` does.
# `make bench ARGS=--quick` is a smoke run in under a minute.
bench: $(STAMP) cluster-tools
	$(PY) -m bench.run $(ARGS)

# The reliability run against real servers: a 10-minute churn soak with 2,000 agents,
# a hypothesis fuzz of both endpoints, deskpush's frame parser against websockets',
# and faults (drops, restarts, slow readers, floods). Prints the tables and writes
# reliability/RESULTS.md (about 15 min on 2 cores); exits 1 if an expectation is
# not met. `make soak ARGS=--quick` takes about 3 minutes.
soak: $(STAMP)
	$(PY) -m reliability.run $(ARGS)

# The browser code's copy of the protocol's names (demo_client/vocabulary.js),
# generated from protocol/vocabulary.py; tests fail when it is stale.
vocabulary: $(SERVE_STAMP)
	$(PY) -c 'from deskpush.protocol.vocabulary import javascript_module as m; print(m(), end="")' > demo_client/vocabulary.js

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache .hypothesis *.egg-info
