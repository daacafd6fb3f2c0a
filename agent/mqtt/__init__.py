"""MQTT v5: ``client`` is the one paho-mqtt adapter; ``codec`` encodes PUBLISH properties."""
