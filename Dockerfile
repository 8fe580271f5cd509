# The MQTT bridge (paho_mqtt_client.py) as a small image: `make docker-build-mqtt-client`.
# Configuration and spool are mounts:
#   docker run -v $PWD/pythonClientConfig.yaml:/config/pythonClientConfig.yaml:ro \
#              -v bridge-spool:/var/lib/bridge paho_mqtt_client
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BRIDGE_SPOOL=/var/lib/bridge/bridge.sqlite3

WORKDIR /app
COPY requirements-bridge.txt .
RUN pip install --no-cache-dir -r requirements-bridge.txt \
    && useradd --system --uid 10001 --home-dir /app bridge \
    && mkdir -p /var/lib/bridge /config \
    && chown bridge /var/lib/bridge

COPY paho_mqtt_client.py helper.py ./
COPY bridge/ bridge/
COPY pipeline/__init__.py pipeline/base.py pipeline/errors.py pipeline/http_client.py pipeline/job.py pipeline/logs.py \
     pipeline/outcome.py pipeline/settings.py pipeline/
COPY pythonClientConfig.yaml /config/pythonClientConfig.yaml

USER bridge
VOLUME ["/var/lib/bridge"]
ENTRYPOINT ["python", "paho_mqtt_client.py"]
CMD ["/config/pythonClientConfig.yaml"]
