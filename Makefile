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

# pid=the PID in $(LOG_DIR)/gateway.pid if that process is alive and is the gateway, else empty.
# A PID file outlives a crash or a reboot and its PID can be reused by an unrelated process: never
# signal that one (the same guard as is_vllm_pid in scripts/common.sh, on /proc/PID/cmdline).
GATEWAY_PID = pid=$$(tr -dc 0-9 2>/dev/null < $(LOG_DIR)/gateway.pid); \
	if [ -z "$$pid" ] || ! kill -0 "$$pid" 2>/dev/null || \
	   ! { tr '\0' ' ' < /proc/$$pid/cmdline 2>/dev/null || ps -o args= -p "$$pid" 2>/dev/null; } \
	     | grep -q embedding_reranker_proxy; then pid=; fi
# A PID file whose process is gone or is not the gateway: say so and remove it.
DROP_STALE_GATEWAY_PID = if [ -f $(LOG_DIR)/gateway.pid ]; then \
	  echo "gateway not running (stale $(LOG_DIR)/gateway.pid removed)"; rm -f $(LOG_DIR)/gateway.pid; fi

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# A venv left without pip (python3 -m venv failing at ensurepip where python3-venv is missing) is made again.
$(STAMP): requirements.txt requirements-dev.txt
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create $(VENV): on Debian/Ubuntu, apt-get install python3-venv, then make again"; exit 1; }; }
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

# The gateway's URL, key file and log file as it reads its settings (environment, then .env or ENV_FILE):
# PORT=9000 in .env must be polled on 9000. Expanded when run's recipe starts, after setup installed .venv.
GATEWAY_WHERE = $(shell $(PY) embedding_reranker_proxy.py where 2>/dev/null)
where_value = $(patsubst $(1)=%,%,$(filter $(1)=%,$(GATEWAY_WHERE)))

run: setup redis-deps ## start the models and the gateway, print the key and a curl to try
	$(eval GATEWAY_URL := $(call where_value,GATEWAY_URL))
	$(eval KEYS_FILE := $(call where_value,API_KEYS_FILE))
	$(eval GATEWAY_LOG := $(call where_value,GATEWAY_LOG))
	@[ -n "$(GATEWAY_URL)" ] || { $(PY) embedding_reranker_proxy.py where; exit 2; }
	@# the models alone: a gateway that is down (crashed, killed) must not make it start models already up
	@./check_models_status.sh --no-gateway >/dev/null 2>&1 && echo "models already up (./check_models_status.sh)" || ./start_vllm_models.sh all
	@mkdir -p $(LOG_DIR)
	@$(PY) embedding_reranker_proxy.py keys init
	@$(GATEWAY_PID); \
	if [ -n "$$pid" ]; then \
	  echo "gateway already running (pid $$pid)"; \
	else \
	  $(DROP_STALE_GATEWAY_PID); \
	  setsid nohup $(PY) embedding_reranker_proxy.py >> $(LOG_DIR)/gateway.out 2>&1 < /dev/null & echo $$! > $(LOG_DIR)/gateway.pid; \
	  for i in $$(seq 1 60); do curl -skf $(GATEWAY_URL)/health >/dev/null && break; sleep 0.5; done; \
	fi
	@curl -skf $(GATEWAY_URL)/health >/dev/null || { echo "gateway did not become healthy at $(GATEWAY_URL); see $(LOG_DIR)/gateway.out"; tail -20 $(LOG_DIR)/gateway.out; exit 1; }
	@echo
	@echo "Gateway: $(GATEWAY_URL)  (logs: $(GATEWAY_LOG))"
	@echo "Models:  $$(curl -sk $(GATEWAY_URL)/health | $(PY) -c 'import json,sys; d=json.load(sys.stdin); print(", ".join(sorted({m for k in d["upstreams"].values() for r in k["replicas"] for m in r["models"]})))')"
	@if [ -f "$(KEYS_FILE).new-key" ]; then echo "The first key is in $(KEYS_FILE).new-key (no terminal to show it on): KEY=\$$(cat $(KEYS_FILE).new-key), save it, delete the file."; fi
	@echo "Try it (KEY is the key shown above on first start, or one from: $(PY) embedding_reranker_proxy.py keys create --name NAME):"
	@echo "  curl $(GATEWAY_URL)/v1/embeddings -H \"Authorization: Bearer \$$KEY\" -H 'Content-Type: application/json' -d '{\"input\": \"hello world\"}'"
	@echo "  curl $(GATEWAY_URL)/v1/rerank -H \"Authorization: Bearer \$$KEY\" -H 'Content-Type: application/json' -d '{\"query\": \"What is AI?\", \"documents\": [\"AI is artificial intelligence\", \"Bananas are yellow\"]}'"
	@echo "Stop everything with: make stop"

stop: ## stop the gateway and the models started by make run
	@$(GATEWAY_PID); \
	if [ -n "$$pid" ]; then kill $$pid 2>/dev/null && echo "gateway stopped" || true; rm -f $(LOG_DIR)/gateway.pid; \
	else $(DROP_STALE_GATEWAY_PID); fi
	./stop_vllm_models.sh all

status: ## models and gateway status
	./check_models_status.sh

clean:
	rm -rf $(VENV) .pytest_cache
