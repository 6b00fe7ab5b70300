# Every target is self-sufficient: it installs what it needs, from committed locks only:
# uv.lock for Python (uv itself pinned below), .tools/package-lock.json for npm.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
NPM_STAMP := .tools/node_modules/.package-lock.json
BUF := .tools/node_modules/.bin/buf
export UV_PYTHON_DOWNLOADS := never

.PHONY: install lock tools redis run demo test proto lint bench dist clean

install: $(STAMP)

# --locked: refuses to install when uv.lock and a pyproject.toml disagree (run `make lock`).
$(STAMP): $(UV) uv.lock pyproject.toml clients/pyproject.toml
	$(UV) sync --locked --quiet --extra otel --python $(PYTHON)
	touch $(STAMP)

$(UV):
	$(PYTHON) -m venv .tools/uv
	.tools/uv/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Rewrites uv.lock after a pyproject.toml change, moving nothing else; UPGRADE=1 moves every
# package to the newest release its range allows. Commit the result with the change.
lock: $(UV)
	$(UV) lock --python $(PYTHON) $(if $(UPGRADE),--upgrade)

# buf (lint and `buf curl`) and the MCP Inspector's CLI (tests/test_mcp_inspector.py, make demo),
# clients nobody here wrote, exactly as .tools/package-lock.json records them.
tools: $(NPM_STAMP)

$(NPM_STAMP): .tools/package.json .tools/package-lock.json
	npm ci --prefix .tools --silent --no-audit --no-fund

# redis-server for the shared rate-limit tests, openssl for the documented TLS commands and nginx
# for the load-balancer test (tests/test_load_balancer.py runs deploy/nginx.conf); installed with
# apt when missing and we are root. nginx is looked for in /usr/sbin too, which a user's PATH may
# leave out. The tests run their own instances on 127.0.0.1, so the packages' services are not
# started (Debian's nginx would listen on port 80 of every address): unless a policy-rc.d
# already decides, one that refuses is in place for the install.
redis:
	@command -v redis-server >/dev/null && command -v openssl >/dev/null \
	  && { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      trap 'rm -f /usr/sbin/policy-rc.d' EXIT; printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
	      chmod 755 /usr/sbin/policy-rc.d; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl nginx >/dev/null; \
	  else echo "redis-server, openssl or nginx is missing: install them (e.g. apt-get install redis-server openssl nginx)"; exit 1; fi; }

run: install
	$(VENV)/bin/aiservices-server --dev-keys

# The service (gRPC and MCP) against the local stand-in upstream: see docs/development.md,
# "Try it locally". It prints commands that use buf and the MCP Inspector, hence `tools`.
# UPSTREAM=openai calls the stand-in's chat completions instead of its Agenta runner.
demo: install tools
	$(if $(UPSTREAM),AGENTA_AI_SERVICES_UPSTREAM=$(UPSTREAM) )$(PY) -m tests.demo

test: install tools redis
	$(PY) -m pytest $(PYTEST_ARGS)

proto: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=clients --grpc_python_out=clients \
	  --mypy_out=clients --mypy_grpc_out=clients \
	  protos/aiservices/v1/tool_service.proto

lint: install tools
	$(UV) lock --check --python $(PYTHON)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy server clients/aiservices clients/aiservices_cli.py tests bench \
	  examples/aiservices-plugin-example/src examples/aiservices-plugin-example/tests
	cd protos && ../$(BUF) lint

# The REST and MCP rows need the `bench` dependency group (FastAPI, uvicorn), which `install`
# includes, so the tests can run the benchmark too: see docs/performance.md.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

# What a deployment installs, into $(DIST): the server's and the client's wheels (built from
# their sdists, which land there too, so nothing is built inside the checkout), and
# constraints.txt, the versions uv.lock holds for what they depend on, the `otel` extra included
# (docs/operations.md).
DIST ?= dist
dist: $(UV)
	rm -f $(DIST)/*.whl $(DIST)/*.tar.gz $(DIST)/constraints.txt
	$(UV) build --quiet --python $(PYTHON) --all-packages --out-dir $(DIST)
	$(UV) export --frozen --quiet --no-default-groups --all-extras --no-emit-workspace --no-hashes \
	  --output-file $(DIST)/constraints.txt

clean:
	rm -rf $(VENV) .tools/uv .tools/node_modules dist build .pytest_cache .mypy_cache .ruff_cache
