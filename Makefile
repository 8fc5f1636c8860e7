# kvgate — everything a developer or CI runs goes through these targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
PROJECT ?= kvgate
IMAGES_ENV := deploy/.build/images.env
DEMO_KEY := deploy/.build/demo-api-key
FLEET_ENV := deploy/.env
# Loads the image names that `make images` chose (local or public) into a recipe's environment.
WITH_IMAGES := set -a && . $(IMAGES_ENV) && set +a && export TESTCONTAINERS_RYUK_DISABLED=true &&
# ... and the compose fleet's secrets (deploy/.env, made by `make env`).
WITH_FLEET := set -a && { [ ! -f $(IMAGES_ENV) ] || . $(IMAGES_ENV); } && . $(FLEET_ENV) && set +a &&
# `make up TLS=1`: the gateways serve TLS with the certificate from `make tls-cert`.
TLS ?=
COMPOSE_FLEET := $(COMPOSE) -p $(PROJECT) -f deploy/compose.yaml $(if $(TLS),-f deploy/compose.tls.yaml)
CHAT_TLS := $(if $(TLS),--tls-ca deploy/.build/tls/ca.crt)

include deploy/images.mk

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/^[^:]*://' | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@echo "==> creating $(VENV) and installing kvgate[dev]"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,sim]'
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create the virtualenv with kvgate and its dev tools

.PHONY: protos
protos: venv ## regenerate protos/kvgate/v1/*_pb2*.py and stubs
	$(PY) protos/generate.py

.PHONY: fmt
fmt: venv ## format the code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: check
check: venv ## ruff (format + lint) and mypy
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

.PHONY: test
test: check images ## everything: lint, types, unit, integration and e2e tests
	$(WITH_IMAGES) $(VENV)/bin/pytest tests -m 'not vllm'

.PHONY: test-unit
test-unit: venv ## unit tests only (no Docker)
	$(VENV)/bin/pytest tests/unit

.PHONY: test-integration
test-integration: venv images ## integration tests (real Redis and Mosquitto containers)
	$(WITH_IMAGES) $(VENV)/bin/pytest tests/integration -m 'not vllm'

.PHONY: test-e2e
test-e2e: venv images ## end-to-end tests against the docker compose fleet
	$(WITH_IMAGES) $(VENV)/bin/pytest tests/e2e

.PHONY: test-vllm
test-vllm: venv ## vLLM contract tests (needs `pip install -e '.[vllm]'` and a GPU)
	$(VENV)/bin/pytest -m vllm tests -o addopts=''

.PHONY: env
env: ## generate deploy/.env (Redis and MQTT passwords of the compose fleet) unless it exists
	bash deploy/make-env.sh $(FLEET_ENV)

.PHONY: up
up: venv images env $(if $(TLS),deploy/.build/tls/server.crt) ## build images, start the compose fleet and stream a sample conversation (TLS=1: with TLS)
	$(WITH_FLEET) $(COMPOSE_FLEET) up -d
	@# The gateway requires API keys: mint a demo key (plus tier) once it is running.
	@$(WITH_FLEET) for i in $$(seq 60); do \
	  $(COMPOSE_FLEET) exec -T gateway-1 \
	    kvgate keys create --tenant demo --tier plus --label make-up > $(DEMO_KEY) 2>/dev/null && break; \
	  sleep 1; done; test -s $(DEMO_KEY) || { echo "could not create a demo API key" >&2; exit 1; }
	@echo "demo API key in $(DEMO_KEY): export KVGATE_API_KEY=\$$(cat $(DEMO_KEY))"
	KVGATE_API_KEY=$$(cat $(DEMO_KEY)) $(VENV)/bin/kvgate chat --gateway localhost:$${KVGATE_GATEWAY_PORT:-50050} $(CHAT_TLS) --wait 120 --demo

.PHONY: status
status: ## live view of the running compose fleet (kvgate status inside a scheduler container)
	$(WITH_FLEET) $(COMPOSE_FLEET) exec scheduler-1 kvgate status

.PHONY: monitoring
monitoring: env ## add Prometheus + Grafana (127.0.0.1:9090, :3000) to the running fleet; needs a registry
	$(WITH_FLEET) $(COMPOSE_FLEET) --profile monitoring up -d prometheus grafana

.PHONY: tls-cert
tls-cert: ## self-signed CA + gateway cert (+ client cert for mTLS) in deploy/.build/tls
	bash deploy/make-tls-cert.sh deploy/.build/tls

deploy/.build/tls/server.crt:
	bash deploy/make-tls-cert.sh deploy/.build/tls

.PHONY: down
down: env ## stop the compose fleet and remove its containers and volumes
	$(WITH_FLEET) $(COMPOSE_FLEET) --profile monitoring down -v --remove-orphans

.PHONY: clean
clean: ## remove build outputs (not the venv)
	rm -rf deploy/.build .mypy_cache .ruff_cache .pytest_cache
