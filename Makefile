# tlsbridge: `make up` runs Kamailio and the bridge on a self-signed default; `make test` tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ROOT     := $(abspath .)
VENV     := $(ROOT)/.venv
PY       := $(VENV)/bin/python
RUN      := $(ROOT)/run
CFG      := $(ROOT)/kamailio-cfg
APT_PKGS := kamailio kamailio-python3-modules kamailio-tls-modules kamailio-websocket-modules \
            python3-venv openssl gnutls-bin iproute2 chromium chromium-driver
PYTEST_ARGS ?=
# make up ROUTING=native: the reference routing in native cfg (routing-native.cfg) instead of KEMI
ROUTING  ?= kemi
ifeq ($(ROUTING),native)
KAM_ROUTING := -A WITH_NATIVE_ROUTING -A 'KEMI_SCRIPT="$(CFG)/tlsbridge_native.py"'
else
KAM_ROUTING := -A 'KEMI_SCRIPT="$(CFG)/routing.py"'
endif

.PHONY: help deps venv certs up down status test test-long lint bench clean webphone

help:
	@echo "make up     start Kamailio and the tlsbridge daemon (TLS on 127.0.0.1:5061)"
	@echo "make down   stop what 'make up' started"
	@echo "make webphone  serve a browser phone (SIP.js) for 'make up' on http://127.0.0.1:8080/"
	@echo "make test   run the whole test suite (unit and integration)"
	@echo "make test-long  the long load and soak tests (1,000 connections, 10 min churn)"
	@echo "make lint   ruff"
	@echo "make bench  benchmark against HAProxy+Kamailio and Kamailio's own TLS (bench/README.md)"

# Debian packages: installed only when one is missing (needs root).
deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@# npm (browser tests: SIP.js) only when there is none: a nodejs from elsewhere bundles its
	@# own npm and conflicts with Debian's package.
	@command -v npm >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends npm; }
	@# Debian starts a packaged kamailio service on install on some systems; ours is separate.

# Kamailio embeds Debian's /usr/bin/python3, so the venv must be built on that interpreter.
$(VENV)/.installed: pyproject.toml | deps
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

certs: venv
	@$(VENV)/bin/tlsbridge dev-certs $(RUN)/certs

up: venv certs
	@mkdir -p $(RUN)
	@if [ -f $(RUN)/kamailio.pid ] && kill -0 $$(cat $(RUN)/kamailio.pid) 2>/dev/null; then \
	  echo "kamailio already running (pid $$(cat $(RUN)/kamailio.pid))"; \
	else \
	  TLSBRIDGE_VENV=$(VENV) TLSBRIDGE_CONFIG=$(CFG)/tlsbridge.toml \
	  kamailio -f $(CFG)/kamailio.cfg -DD -E $(KAM_ROUTING) \
	    -A 'CTL_SOCKET="unix:$(RUN)/kamailio_ctl"' -Y $(RUN) -P $(RUN)/kamailio.pid \
	    >>$(RUN)/kamailio.log 2>&1 & \
	  for i in $$(seq 50); do [ -s $(RUN)/kamailio.pid ] && break; sleep 0.1; done; \
	fi
	@if [ -f $(RUN)/tlsbridge.pid ] && kill -0 $$(cat $(RUN)/tlsbridge.pid) 2>/dev/null; then \
	  echo "tlsbridge already running (pid $$(cat $(RUN)/tlsbridge.pid))"; \
	else \
	  $(VENV)/bin/tlsbridge run -c $(CFG)/tlsbridge.toml >>$(RUN)/tlsbridge.log 2>&1 & \
	  echo $$! > $(RUN)/tlsbridge.pid; \
	fi
	@$(PY) scripts/sip_ping.py udp 127.0.0.1 5060 --wait 15 --quiet \
	  || { echo "kamailio did not answer; see $(RUN)/kamailio.log"; exit 1; }
	@$(PY) scripts/sip_ping.py tls 127.0.0.1 5061 --ca $(RUN)/certs/ca.pem --wait 15 --quiet \
	  || { echo "tlsbridge did not answer; see $(RUN)/tlsbridge.log"; exit 1; }
	@$(PY) scripts/sip_ping.py wss 127.0.0.1 8443 --ca $(RUN)/certs/ca.pem --wait 5 --quiet \
	  --origin http://127.0.0.1:8080 \
	  || { echo "WSS did not answer; see $(RUN)/tlsbridge.log $(RUN)/kamailio.log"; exit 1; }
	@echo "up:"
	@echo "  SIP over TLS  127.0.0.1:5061   (tlsbridge pid $$(cat $(RUN)/tlsbridge.pid), CA $(RUN)/certs/ca.pem)"
	@echo "  SIP over WSS  wss://127.0.0.1:8443/ (browsers; phone page: .venv/bin/python scripts/webphone.py)"
	@echo "  SIP over UDP  127.0.0.1:5060   (kamailio pid $$(cat $(RUN)/kamailio.pid))"
	@echo "  hairpin       tcp 127.0.0.1:5062 (Kamailio, PROXY v1)"
	@echo "  events        ipc://$(RUN)/events.sock"
	@echo "  control       ipc://$(RUN)/control.sock"
	@echo "  logs          $(RUN)/tlsbridge.log $(RUN)/kamailio.log"

# A browser phone against `make up`'s WSS listener (SIP.js from npm, installed on first use).
webphone: venv
	$(PY) scripts/webphone.py --port 8080 --server wss://127.0.0.1:8443/

down:
	@for name in tlsbridge kamailio; do \
	  f=$(RUN)/$$name.pid; \
	  if [ -f $$f ] && kill -0 $$(cat $$f) 2>/dev/null; then \
	    pid=$$(cat $$f); kill $$pid; \
	    for i in $$(seq 50); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
	    kill -0 $$pid 2>/dev/null && kill -9 $$pid; \
	    echo "stopped $$name (pid $$pid)"; \
	  fi; \
	  rm -f $$f; \
	done

test: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

test-long: venv
	$(VENV)/bin/pytest -m long tests/faults tests/security $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

clean: down
	rm -rf $(RUN)
