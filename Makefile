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
# Host port for the bridge container's Prometheus metrics (bridge.metrics_port, 9464 inside).
BRIDGE_METRICS_HOST_PORT ?= 9464
GATEWAY_FILES ?= $(HOME)/data/gateway-files
# The service's job ledger in the container: on the gateway-files volume, which outlives the
# container and which the service can write (it writes its output files there).
CONTAINER_LEDGER ?= /tmp/files/.aicsd-pipeline/ledger.sqlite3
# AiCSD's own models/ folder (where its UI's Upload Models puts models). When set, `make run`
# mounts it read-only and the service serves its models next to the bento's, picking up new
# ones without a restart; PIPELINE_MODEL_POLL (seconds) sets how often it looks.
AICSD_MODELS ?=
PIPELINE_MODEL_POLL ?= 2

# No usage tracking: the service talks only to AiCSD's callback URLs.
export BENTOML_DO_NOT_TRACK := True

.DEFAULT_GOAL := help
.PHONY: help setup models serve test lint demo bench clean build docker-build-bento docker-build run down \
        docker-down-bento docker-build-mqtt-client run-mqtt-client docker-down-mqtt-client

# The reference's usage message when BENTO_TAG is missing; $(1) is the make command to show.
define require_bento_tag
	@if [ -z "$(BENTO_TAG)" ]; then \
		echo "BENTO_TAG is not set, correct usage - make $(1) BENTO_TAG=<bento_image_name>:<bento_image_tag>" >&2; \
		exit 2; fi
endef

# Stop and remove the containers started from image $(1); quiet success when there are none.
define docker_down
	@if ! docker info >/dev/null 2>&1; then echo "docker engine not reachable: no $(1) container to stop"; exit 0; fi; \
	ids=$$(docker ps -aq --filter ancestor=$(1)); \
	if [ -n "$$ids" ]; then docker rm -f $$ids >/dev/null && echo "stopped and removed $(1) container(s)"; \
	else echo "no $(1) container running"; fi
endef

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

lint: $(VENV)/.installed ## Check style (ruff) and types (mypy; strict for aicsd/ and the bridge)
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: setup ## Measure the whole chain against benchmark_app, CPU per job of each process (about 5 min; BENCH_ARGS=--soak for 10,000 jobs)
	$(PY) -m bench $(BENCH_ARGS)

build: models ## Build the bento (bentoml build) and print its tag
	@$(BENTOML) build -o tag > .bento-build.log 2>&1 || { cat .bento-build.log >&2; exit 1; }
	@tag=$$(sed -n 's/^__tag__://p' .bento-build.log); rm -f .bento-build.log; \
	echo ""; echo "Built bento: $$tag"; echo ""; \
	echo "  make docker-build BENTO_TAG=$$tag"; \
	echo "  make run BENTO_TAG=$$tag"; \
	echo "  bentoml serve $$tag"

docker-build-bento: ## Build the bento's container image (BENTO_TAG=<name>:<tag> from make build)
	$(call require_bento_tag,docker-build)
	$(BENTOML) containerize $(BENTO_TAG)

docker-build: ## Build the bento image and the bridge image (BENTO_TAG required)
	$(call require_bento_tag,docker-build)
	$(MAKE) --no-print-directory docker-build-mqtt-client
	$(MAKE) --no-print-directory docker-build-bento BENTO_TAG=$(BENTO_TAG)

run: ## Start the bento container on the EdgeX network, then the bridge container (BENTO_TAG required; AICSD_MODELS=<AiCSD>/models)
	$(call require_bento_tag,run)
	@if [ -n "$(AICSD_MODELS)" ] && [ ! -d "$(AICSD_MODELS)" ]; then \
		echo "AICSD_MODELS=$(AICSD_MODELS) is not a folder: give the AiCSD project's models/ folder" >&2; exit 2; fi
	@if [ -z "$(AICSD_MODELS)" ]; then \
		echo "note: serving the bento's own models only; add AICSD_MODELS=<AiCSD project>/models to serve AiCSD's too"; fi
	docker run -itd --network=$(EDGEX_NETWORK) -p $(PORT):3000 -v $(GATEWAY_FILES):/tmp/files \
		$(if $(AICSD_MODELS),-v $(abspath $(AICSD_MODELS)):/aicsd-models:ro -e PIPELINE_MODELS_DIR=models:/aicsd-models) \
		-e PIPELINE_MODEL_POLL=$(PIPELINE_MODEL_POLL) -e PIPELINE_LEDGER=$(CONTAINER_LEDGER) $(BENTO_TAG) serve
	$(MAKE) --no-print-directory run-mqtt-client

docker-down-bento: ## Stop and remove the bento container (BENTO_TAG required; quiet when none runs)
	$(call require_bento_tag,docker-down-bento)
	$(call docker_down,$(BENTO_TAG))

down: ## Stop and remove the bento and bridge containers (BENTO_TAG required; quiet when none runs)
	$(call require_bento_tag,down)
	$(MAKE) --no-print-directory docker-down-bento BENTO_TAG=$(BENTO_TAG)
	$(MAKE) --no-print-directory docker-down-mqtt-client

docker-build-mqtt-client: ## Build the MQTT bridge image (paho_mqtt_client)
	docker build -t $(MQTT_CLIENT_IMAGE) .

run-mqtt-client: ## Start the bridge container on the EdgeX network with pythonClientConfig.yaml
	docker volume create paho_mqtt_client_spool >/dev/null
	docker run -itd --network=$(EDGEX_NETWORK) -p $(BRIDGE_METRICS_HOST_PORT):9464 \
		-v $(MQTT_CLIENT_CONFIG):/config/pythonClientConfig.yaml:ro \
		-v paho_mqtt_client_spool:/var/lib/bridge \
		$(MQTT_CLIENT_IMAGE):latest

docker-down-mqtt-client: ## Stop and remove the bridge container (quiet when none runs)
	$(call docker_down,$(MQTT_CLIENT_IMAGE):latest)

clean: ## Remove built models, demo files, caches and test artifacts (keeps .venv)
	rm -rf $(MODELS_DIR)/*/ .demo .pytest_cache test-artifacts
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
