# Two commands from a fresh clone: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench fuzz test-tools proto venv-tools clean

$(BIN)/.installed: pyproject.toml | venv-tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/millwright demo

# Benchmarks (not part of the tests): see bench/README.md. Results go to bench/results/.
bench: $(BIN)/.installed test-tools
	$(BIN)/python -m bench all

# Coverage-guided fuzzing of the config loader, the Sparkplug decoder and the edge node's
# command handling (atheris; FUZZ_SECONDS each). Not part of the tests: see bench/fuzz.py.
FUZZ_SECONDS ?= 60
fuzz: $(BIN)/.installed
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install --quiet atheris
	for target in config sparkplug commands; do \
	  $(BIN)/python -m bench.fuzz $$target --seconds $(FUZZ_SECONDS) || exit 1; \
	done

# test-tools: mosquitto is the real broker the tests start on free ports (openssl makes their TLS
# certificates, protoc cross-checks the Sparkplug encoding, socat makes virtual serial lines, mbpoll
# is a third-party Modbus RTU master, chromium the browser that Playwright drives through the
# status page: Debian's, never a download). Installed with apt-get when
# missing and we are root; otherwise say how.
test-tools:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto mosquitto-clients"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v protoc >/dev/null || missing="$$missing protobuf-compiler"; \
	command -v socat >/dev/null || missing="$$missing socat"; \
	command -v mbpoll >/dev/null || missing="$$missing mbpoll"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  $(call apt_install,$$missing); \
	fi

# Regenerate the Sparkplug B payload code after editing its schema (needs protoc).
proto:
	cd gateway/publishers/sparkplug && protoc --python_out=. --pyi_out=. sparkplug_b.proto

# Debian's python3 has no venv module until python3-venv is installed.
venv-tools:
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  $(call apt_install,python3-venv); \
	fi

apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(1) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	  else \
	    echo "Missing: $(1). Install it, e.g.: sudo apt-get install $(1)"; \
	    exit 1; \
	  fi

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(BIN)/.installed test-tools lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
