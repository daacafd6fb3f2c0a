"""Reserved names: the controllers' namespace of device ids. Pure, no dependencies
(the agent's config imports it without pulling in cryptography).

The broker's ACL (docs/fleet-protocol.md) gives the controller identity,
``controller``, the whole topic tree. A device whose certificate carried such a
name would get the same rights, so no device id may start with ``controller``
(in any case): the namespace is reserved for controllers. The agent refuses
such an id in its config and the controller refuses it as a deployment target.
"""

from __future__ import annotations

from typing import Final

RESERVED_DEVICE_PREFIX: Final = "controller"


def is_reserved_device_id(value: str) -> bool:
    """True for ids in the controllers' namespace (``controller...``, any case)."""
    return value.lower().startswith(RESERVED_DEVICE_PREFIX)
