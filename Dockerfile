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

# Whole packages: the bridge imports the AiCSD contract (aicsd/) and its own package, nothing else.
COPY paho_mqtt_client.py ./
COPY aicsd/ aicsd/
COPY bridge/ bridge/
COPY pythonClientConfig.yaml /config/pythonClientConfig.yaml

USER bridge
# Prometheus metrics (bridge.metrics_port in pythonClientConfig.yaml); publish with -p 9464:9464.
EXPOSE 9464
VOLUME ["/var/lib/bridge"]
ENTRYPOINT ["python", "paho_mqtt_client.py"]
CMD ["/config/pythonClientConfig.yaml"]
