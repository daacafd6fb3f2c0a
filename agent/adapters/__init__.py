"""The real implementations of the fleet updater's ports (``agent.fleet.ports``).

Where the updater meets the serving side (onnxruntime, model configs) and the
MQTT client; used by the composition root (``agent.app``) and the simulators.
"""
