"""The MQTT bridge: AiCSD jobs from the broker, kept durably, forwarded to the pipeline service."""
