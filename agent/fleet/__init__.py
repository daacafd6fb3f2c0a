"""Fleet updates over MQTT: signed deployments, the update life cycle, the updater.

``deployment`` (parse and verify a signed deployment) and ``lifecycle`` (the
update state machine) are pure; ``downloader``, ``validation`` and ``updater``
are the I/O around them, driven by ``updater.Updater``.

This package's ``__init__`` imports nothing on purpose: ``deployment`` must stay
importable next to tritonclient (it does not pull in ``agent.wire``), while the
updater needs the model manager, which does.
"""
