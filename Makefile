# AiCSD custom pipeline: BentoML service + MQTT bridge. `make help` lists the targets.
# The reference demo's targets keep their names and meaning: build, serve, docker-build-bento,
# docker-build-mqtt-client, docker-build, run, run-mqtt-client, docker-down-bento,
# docker-down-mqtt-client, down.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENTOML := $(VENV)/bin/bentoml
PORT ?= 3000
MODELS_DIR ?= models
MQTT_CLIENT_IMAGE ?= paho_mqtt_client
MQTT_CLIENT_CONFIG ?= $(CURDIR)/pythonClientConfig.yaml
EDGEX_NETWORK ?= edgex_edgex-network
GATEWAY_FILES ?= $(HOME)/data/gateway-files

# No usage tracking: the service talks only to AiCSD's callback URLs.
export BENTOML_DO_NOT_TRACK := True

.DEFAULT_GOAL := help
.PHONY: help setup models serve test demo clean \
        docker-build-mqtt-client run-mqtt-client docker-down-mqtt-client

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

serve: $(VENV)/.installed ## Run the service locally with bentoml serve on PORT (default 3000)
	$(BENTOML) serve service:AicsdPipeline --port $(PORT)

demo: setup ## Run broker, service, bridge and an AiCSD stand-in on sample images, then stop them
	$(PY) -m devtools.demo

test: setup ## Run the test suite
	$(PY) -m pytest

docker-build-mqtt-client: ## Build the MQTT bridge image (paho_mqtt_client)
	docker build -t $(MQTT_CLIENT_IMAGE) .

run-mqtt-client: ## Start the bridge container on the EdgeX network with pythonClientConfig.yaml
	docker volume create paho_mqtt_client_spool >/dev/null
	docker run -itd --network=$(EDGEX_NETWORK) \
		-v $(MQTT_CLIENT_CONFIG):/config/pythonClientConfig.yaml:ro \
		-v paho_mqtt_client_spool:/var/lib/bridge \
		$(MQTT_CLIENT_IMAGE):latest

docker-down-mqtt-client: ## Stop and remove the bridge container (quiet when none runs)
	@ids=$$(docker ps -q --filter ancestor=$(MQTT_CLIENT_IMAGE):latest 2>/dev/null); \
	if [ -n "$$ids" ]; then docker rm -f $$ids >/dev/null && echo "removed $(MQTT_CLIENT_IMAGE) container(s)"; \
	else echo "no $(MQTT_CLIENT_IMAGE) container running"; fi

clean: ## Remove built models, demo files, caches and test artifacts (keeps .venv)
	rm -rf $(MODELS_DIR)/*/ .demo .pytest_cache test-artifacts
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
