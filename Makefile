# Two commands from a fresh clone: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint check-tools mosquitto clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/millwright demo

# mosquitto is the real broker the tests start on free ports (and openssl makes their TLS
# certificates). Installed with apt-get when missing and we are root; otherwise say how.
mosquitto:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v openssl >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing mosquitto and openssl with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients openssl >/dev/null; \
	  else \
	    echo "The tests need mosquitto and openssl. Install them, e.g.:"; \
	    echo "  sudo apt-get install mosquitto mosquitto-clients openssl"; \
	    exit 1; \
	  fi; \
	fi

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(BIN)/.installed mosquitto lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
