"""The fleet controller: the other end of docs/fleet-protocol.md.

``store`` keeps published model versions as content-addressed blobs plus one
manifest per version; ``deploy`` builds and signs deployment documents and
publishes them retained to each device's ``desired`` topic; ``server`` answers
chunk requests from a shared subscription; ``status`` keeps the latest report
of every device; ``service`` wires them to one MQTT connection; ``cli`` is the
``edge-controller`` command. Nothing here imports ``agent.wire``.
"""
