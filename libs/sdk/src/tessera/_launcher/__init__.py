"""The ``tessera`` command: bring a whole Tessera cluster up on one machine with pip alone.

``tessera up`` starts nats-server (JetStream) and redis-server (AOF) on free
ports — unless ``TESSERA_NATS_URL`` / ``TESSERA_REDIS_URLS`` name running ones —
then the six services, under a small supervisor that restarts any that dies.
Everything it starts is recorded in the run directory (``TESSERA_RUN_DIR``,
default ``~/.tessera/run``), where the SDK and the other commands find it.
"""
