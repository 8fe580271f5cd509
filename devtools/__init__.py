"""Development tools shared by `make demo`, the tests and the benchmark: an AiCSD stand-in and
helpers that run real servers (Mosquitto, `bentoml serve`, the bridge) on loopback ports.
Not part of the bento or the bridge image."""
