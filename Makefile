# routemqd: `make run` starts the daemon with the example manifest, `make test` runs the tests.
# Both install what they need (a virtualenv in .venv, and mosquitto via apt-get when root).

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
MANIFEST ?= etc/routemq.yaml
STAMP    := $(VENV)/.installed-stamp

.PHONY: install system-deps run test chaos systemd-test bench lint check install-systemd clean help

help:
	@echo "make run      start a local broker (if none) and routemqd with $(MANIFEST)"
	@echo "make test     install everything and run the test suite"
	@echo "make chaos    long chaos soak (slow tests)"
	@echo "make systemd-test  the service path under a real systemd 252 in a Debian 12 container (root)"
	@echo "make bench    benchmarks: routemqd vs a raw paho-mqtt consumer"
	@echo "make lint     ruff"
	@echo "make check    routemqd check -c $(MANIFEST)"
	@echo "make install-systemd   install the unit, /etc/routemq.yaml and the routemqd user"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

# mosquitto (broker + clients) for the tests and `make run`; systemd-analyze for the unit test.
system-deps:
	@scripts/system-deps

run: install system-deps
	@scripts/run-local $(MANIFEST)

test: install system-deps
	$(BIN)/pytest

chaos: install system-deps
	$(BIN)/pytest -m slow -s tests/chaos

# Boots Debian 12 with systemd as PID 1 (systemd-nspawn) and runs the README's service path. The
# root file system is built once (debootstrap, a few minutes) and cached in $(SYSTEMD_TEST_CACHE).
SYSTEMD_TEST_CACHE ?= /var/cache/routemqd/systemd-test
systemd-test: install system-deps
	@scripts/systemd-test-rootfs $(SYSTEMD_TEST_CACHE)/bookworm
	ROUTEMQD_SYSTEMD_TEST_CACHE=$(SYSTEMD_TEST_CACHE) $(BIN)/pytest -m systemd -v -s -p no:cacheprovider tests/systemd

bench: install system-deps
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

lint: install
	$(BIN)/ruff check routemqd tests bench examples
	$(BIN)/ruff format --check routemqd tests bench examples

check: install
	$(BIN)/routemqd check -c $(MANIFEST)

install-systemd:
	@scripts/install-systemd

clean:
	rm -rf $(VENV) run .pytest_cache .ruff_cache .hypothesis *.egg-info
