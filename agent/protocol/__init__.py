"""The fleet protocol (docs/fleet-protocol.md), pure and shared by device and controller.

Topic names, message schemas and versions, name rules, device tags and signed
deployment documents. No I/O: both ends and the simulators use these modules.
"""
