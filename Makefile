# Two commands do all the set-up: `make demo` and `make test`. Both install what they need.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SYSTEM_STAMP := $(VENV)/.system-stamp
ARGS   ?=

.PHONY: setup test lint demo bench proto clean

setup: $(STAMP)

# System tools the tests and the demo use (openssl for the independent certificate check,
# iproute2/iptables for multi-host tests). Installed once with apt-get when missing.
$(SYSTEM_STAMP):
	@python3 -m venv $(VENV)
	@missing=""; for t in openssl:openssl ip:iproute2 iptables:iptables; do \
	  command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing system packages:$$missing (run as root to install)"; fi; fi
	@touch $@

$(STAMP): pyproject.toml $(SYSTEM_STAMP)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lint: setup
	$(VENV)/bin/ruff check verity tests bench demo
	$(VENV)/bin/mypy verity tests bench demo
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q tests

demo: setup
	$(PY) -m demo $(ARGS)

bench: setup
	@command -v h2load >/dev/null 2>&1 || if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client; else echo "warning: missing system package: nghttp2-client (run as root to install)"; fi
	for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Regenerate the gRPC code of the wire protocols (committed, so users need no protoc).
proto: setup
	$(PY) -m grpc_tools.protoc -Iverity/protocol=verity/protocol --python_out=. --pyi_out=. \
	  --grpc_python_out=. verity/protocol/*.proto

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
