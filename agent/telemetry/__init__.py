"""Health and drift telemetry: upstream over MQTT through a durable outbox, and Prometheus.

- ``drift``: reference profiles and per-window drift statistics (pure).
- ``profile_io``: reference data sets in, ``drift_profile.json`` out.
- ``monitor``: the sampling hook on the data plane and the drift thread.
- ``health``: host, process and per-model-version figures.
- ``outbox``: the SQLite store-and-forward outbox.
- ``metrics``: the Prometheus endpoint.
- ``publisher``: the service that ties them together on the event loop.
- ``cli``: ``edge-agent profile``.

``drift``, ``profile_io`` and ``outbox`` import no protobuf code (``agent.wire``).
"""
