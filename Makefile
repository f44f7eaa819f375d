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

.PHONY: setup proto test test-unit lint lint-py lint-protos clean tools

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

test: setup
	$(PY) -m pytest

lint: lint-py lint-protos

lint-py: setup
	$(VENV)/bin/ruff check .

lint-protos: tools
	cd protos && ../$(BUF) lint

clean:
	rm -rf $(VENV) $(GEN) tools/node_modules .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
