# Every target is self-sufficient: it creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# The MCP Inspector's CLI, a client nobody here wrote (tests/test_mcp_inspector.py, make demo).
INSPECTOR_VERSION := 2.12.0
INSPECTOR := .tools/node_modules/.bin/mcp-inspector

.PHONY: install tools redis run demo test proto lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# -qq: setuptools' editable builds warn about folders named like their packages (that is
	# the layout here); errors still print.
	$(PY) -m pip install -qq -e ./clients -e '.[dev,bench]'
	touch $(STAMP)

# buf (lint and `buf curl`) and the MCP Inspector come from npm, pinned, into .tools/.
tools: $(BUF) $(INSPECTOR)

$(BUF):
	mkdir -p .tools
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

$(INSPECTOR):
	mkdir -p .tools
	npm install --silent --no-audit --no-fund --save-exact --prefix .tools \
	  @modelcontextprotocol/inspector@$(INSPECTOR_VERSION)

# redis-server for the shared rate-limit tests and openssl for the documented TLS commands;
# installed with apt when missing and we are root.
redis:
	@command -v redis-server >/dev/null && command -v openssl >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl >/dev/null; \
	  else echo "redis-server or openssl is missing: install them (e.g. apt-get install redis-server openssl)"; exit 1; fi; }

run: install
	$(PY) -m server --dev-keys

# The service (gRPC and MCP) against the local stand-in upstream: see docs/development.md,
# "Try it locally". It prints commands that use buf and the MCP Inspector, hence `tools`.
# UPSTREAM=openai calls the stand-in's chat completions instead of its Agenta runner.
demo: install tools
	$(if $(UPSTREAM),AGENTA_AI_SERVICES_UPSTREAM=$(UPSTREAM) )$(PY) -m server.demo

test: install tools redis
	$(PY) -m pytest $(PYTEST_ARGS)

proto: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=clients --grpc_python_out=clients \
	  --mypy_out=clients --mypy_grpc_out=clients \
	  protos/aiservices/v1/tool_service.proto

lint: install tools
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy server clients/aiservices clients/aiservices_cli.py tests bench
	cd protos && ../$(BUF) lint

# The REST and MCP rows need the optional `bench` extra (FastAPI, uvicorn), which `install`
# includes, so the tests can run the benchmark too: see docs/performance.md.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
