# pytest-boxlite: `make demo` and `make test` do all set-up on a fresh Debian 12 or 13 machine.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: setup system-packages venv image demo lint test bench clean

setup: system-packages venv image

system-packages:
	@tools/install-system-packages

$(PY): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	@touch $(PY)

venv: $(PY)

# What a user's `boxlite setup` does after the packages: the embedded default image (a Debian root filesystem with
# python3, built once from the host's apt sources), its boot snapshot (the guest agent is compiled on the way,
# into the runtime home), then `boxlite doctor`.
image: venv
	$(VENV)/bin/boxlite setup --no-install

# The runtime demo, then the plugin's: examples/ run with every test in a microVM; the host is checked after.
demo: setup
	$(PY) examples/demo.py
	$(PY) -m pytest --boxlite -v -p no:cacheprovider examples/test_examples.py
	@test -f examples/test_examples.py && test -d /usr/share && echo "host untouched: examples/ and /usr/share still there"

# Style and types (configured in pyproject.toml), checked before anything boots.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# After the suite, the Debian 13 stage (tools/debian13-stage): a trixie root, the project cloned and run there.
test: lint setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)
	tools/debian13-stage

bench: setup
	$(PY) bench/boot.py
	$(PY) bench/exec_roundtrip.py
	$(PY) bench/idle_rss.py
	$(PY) bench/snapshot.py
	$(PY) bench/plugin_suite.py
	$(PY) bench/pull.py
	$(PY) bench/cached_create.py

clean:
	rm -rf $(VENV) *.egg-info build
