# routemqd: `make run` starts the daemon with the example manifest, `make test` runs the tests.
# Both install what they need: the system packages first (scripts/system-deps: with apt-get when
# root), then a virtualenv in .venv.

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
	@echo "make install  the virtualenv in $(VENV) with routemqd and its test tools"
	@echo "make system-deps  mosquitto, systemd-analyze, postgresql, python3-venv, promtool (apt-get as root)"
	@echo "make install-systemd   install the unit, /etc/routemq.yaml and the routemqd user"
	@echo "make clean    remove $(VENV), run/, the tool caches and *.egg-info"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

# mosquitto + mosquitto-clients (the broker and mosquitto_pub), systemd (systemd-analyze, for the
# unit-file test), postgresql (server binaries for the tests' private clusters), python3-venv
# (ensurepip, for `python -m venv`) and promtool (taken out of Debian's prometheus package into
# /var/cache/routemqd/bin, so no Prometheus server starts). The Debian packages start their own
# broker on 1883 and PostgreSQL on 5432; the tests never use them. Listed before `install` in the
# targets below, because make builds prerequisites left to right and the venv needs ensurepip.
system-deps:
	@PYTHON=$(PYTHON) scripts/system-deps

run: system-deps install
	@scripts/run-local $(MANIFEST)

test: system-deps install
	$(BIN)/pytest

chaos: system-deps install
	$(BIN)/pytest -m slow -s tests/chaos

# Boots Debian 12 with systemd as PID 1 (systemd-nspawn) and runs the README's service path. The
# root file system is built once (debootstrap, a few minutes) and cached in $(SYSTEMD_TEST_CACHE).
SYSTEMD_TEST_CACHE ?= /var/cache/routemqd/systemd-test
systemd-test: system-deps install
	@scripts/systemd-test-rootfs $(SYSTEMD_TEST_CACHE)/bookworm
	ROUTEMQD_SYSTEMD_TEST_CACHE=$(SYSTEMD_TEST_CACHE) $(BIN)/pytest -m systemd -v -s -p no:cacheprovider tests/systemd

bench: system-deps install
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
