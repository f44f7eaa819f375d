# Exocore in Python. `make run` starts a local one-node cell; `make test` runs the test suite.
# Both work on a fresh clone: they create the venv and generate the stubs first.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
GEN := libs/exocommon/gen
PROTOS := $(shell find protos -name '*.proto')
SETUP_STAMP := $(VENV)/.setup-stamp
PROTO_STAMP := $(GEN)/.proto-stamp
TOOLS_STAMP := tools/node_modules/.tools-stamp
BUF := tools/node_modules/.bin/buf

EXO := $(VENV)/bin/exo
# `make run`'s node folder (kept by `make clean`; `make clean-run` removes it).
RUN_NODE := .exo/node

.PHONY: setup proto run test test-unit lint lint-py lint-protos clean clean-run tools apps bench-apphost bench-gateway \
	bench-store bench-chain

setup: $(SETUP_STAMP) $(PROTO_STAMP)

$(SETUP_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

proto: $(PROTO_STAMP)

# Stubs are generated, never edited: `gen/` is rebuilt from protos/ and ignored by git.
$(PROTO_STAMP): $(SETUP_STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	cd protos && ../$(PY) -m grpc_tools.protoc -I. --python_out=../$(GEN) --pyi_out=../$(GEN) \
		--grpc_python_out=../$(GEN) --descriptor_set_out=../$(GEN)/exocore.fds --include_imports \
		$(patsubst protos/%,%,$(PROTOS))
	find $(GEN)/exocore -type d -exec touch {}/__init__.py \;
	$(PY) -c 'import site, os; open(os.path.join(site.getsitepackages()[0], "exocore_gen.pth"), "w").write(os.path.abspath("$(GEN)") + "\n")'
	@touch $@

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): tools/package.json
	npm install --prefix tools --no-audit --no-fund --silent
	@touch $@

# A local one-node cell: created on the first run, then its services (chain, store, gateway) run in
# the foreground. Once the gateway answers, `exogateway.runinfo` prints its address, an auth token and
# example commands (buf comes from `make tools`).
run: setup tools
	@test -f $(RUN_NODE)/node.yaml || $(EXO) -d $(RUN_NODE) node init --name local
	@test -d $(RUN_NODE)/cells || $(EXO) -d $(RUN_NODE) cell init --name local
	@$(PY) -m exogateway.runinfo --dir $(RUN_NODE) --exo $(EXO) --buf $(BUF) --wait-s 120 & \
	$(EXO) -d $(RUN_NODE) daemon

test: setup apps tools
	$(PY) -m pytest

# WebAssembly apps built from C with zig (the `ziglang` wheel of the dev dependencies): the example
# app (SPEC 5.5) the app host's tests and `make bench-apphost` run, and the benchmark guest.
APPHOST := services/apphost
APP_SDK := $(APPHOST)/sdk/exocore.h $(APPHOST)/sdk/exocore.c
APP_WASM := $(APPHOST)/examples/example/example.wasm $(APPHOST)/examples/bench/bench.wasm
APP_CFLAGS := --target=wasm32-freestanding -O2 -s -nostdlib -mbulk-memory -Wall -Wextra -Werror \
	-I$(APPHOST)/sdk -Wl,--no-entry -Wl,-z,stack-size=65536

apps: $(APP_WASM)

$(APPHOST)/examples/%.wasm: $(APPHOST)/examples/%.c $(APP_SDK) $(SETUP_STAMP)
	$(PY) -m ziglang cc $(APP_CFLAGS) -o $@ $< $(APPHOST)/sdk/exocore.c

bench-apphost: setup apps
	$(PY) -m exoapphost.bench

# Gateway overhead and throughput on one loopback node (a benchmark, not a test): Mutate and Query
# calls/s and p50/p99 with 1 and 32 clients, through the gateway and directly against the store.
bench-gateway: setup
	$(PY) bench/gateway_bench.py

# The store on 100,000 generated notes through chain + store processes on loopback (a benchmark, not a
# test): indexing rate, query p50/p99 per kind, watch notification latency, next to a bare tantivy index
# and a gRPC echo. `make bench-store BENCH_STORE_ARGS="--entities 20000"` for a shorter run.
bench-store: setup
	$(PY) bench/bench_store.py $(BENCH_STORE_ARGS)

# The chain on a 3-node loopback cell (a benchmark, not a test): committed entries/s with 1 and 16
# appenders, append and append-to-committed latency p50/p99, catch-up of an empty node, with the
# default settings and a tuned one. `make bench-chain BENCH_CHAIN_ARGS="--quick"` for a shorter run.
bench-chain: setup
	$(PY) bench/bench_chain.py $(BENCH_CHAIN_ARGS)

# --- Deployment: container images, docker-compose, Kubernetes (deploy/, README "Deploy") ---------
# podman needs deploy/containers.conf on these machines (runc, cgroupfs, ulimits: TOOLCHAIN.md).
.PHONY: deploy-setup images compose-up compose-down k8s-render test-deploy
PODMAN_ENV := CONTAINERS_CONF=$(CURDIR)/deploy/containers.conf
DEPLOY_APT := podman runc netavark aardvark-dns catatonit busybox-static debootstrap docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NODES ?= 3

# The system packages of the container targets (idempotent: installs only what is missing).
deploy-setup:
	@missing=$$(for p in $(DEPLOY_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "deploy-setup: $(DEPLOY_APT) installed"; fi

# localhost/exocore:latest (EXO_IMAGE); the base is python:3.11-slim, else a local debootstrap one.
images: setup
	$(PODMAN_ENV) PY=$(PY) deploy/images.sh

# A compose cell of NODES (3 or 1) nodes: configs generated once, image built, up, healthy; prints
# the published gateway ports, a token and an example `exo store` command.
compose-up: images
	$(PODMAN_ENV) $(PY) deploy/compose/composectl.py up --nodes $(NODES)

compose-down: setup
	$(PODMAN_ENV) $(PY) deploy/compose/composectl.py down --nodes $(NODES)

# The Secrets/ConfigMaps of the k8s overlays (cells kept in deploy/k8s/cells: private keys).
k8s-render: setup
	$(EXO) deploy k8s render --cell deploy/k8s/cells/dev --nodes 1 --out deploy/k8s/overlays/dev/generated
	$(EXO) deploy k8s render --cell deploy/k8s/cells/three-node --nodes 3 --out deploy/k8s/overlays/three-node/generated

# Real containers (not in `make test`): a three-node podman-compose cell, writes and reads through
# gateways, a store and a chain container killed and caught up, the gateway scaled to 2.
test-deploy: images
	$(PODMAN_ENV) EXO_TEST_DEPLOY=1 $(PY) -m pytest -s -q -p no:cacheprovider tests/deploy/test_compose_cell.py

lint: lint-py lint-protos

lint-py: setup
	$(VENV)/bin/ruff check .

lint-protos: tools
	cd protos && ../$(BUF) lint

# Keeps .exo (the `make run` cell and its data).
clean:
	rm -rf $(VENV) $(GEN) tools/node_modules .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

clean-run:
	rm -rf .exo
