# AiCSD custom pipeline: BentoML service + MQTT bridge. `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
MODELS_DIR ?= models

# No usage tracking: the service talks only to AiCSD's callback URLs.
export BENTOML_DO_NOT_TRACK := True

.DEFAULT_GOAL := help
.PHONY: help setup models serve test clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-26s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed models ## Make .venv, install runtime and test requirements, build the models

models: $(VENV)/.installed ## Build the OpenVINO models into models/ (skips what is up to date)
	$(PY) -m model_builders --models-dir $(MODELS_DIR)

serve: $(VENV)/.installed ## Run the service locally on PORT (default 3000)
	$(VENV)/bin/bentoml serve service:AicsdPipeline --port $(PORT)

test: setup ## Run the test suite
	$(PY) -m pytest

clean: ## Remove built models, caches and test artifacts (keeps .venv)
	rm -rf $(MODELS_DIR)/*/ .pytest_cache test-artifacts
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
