"""How a job step ends the job (JobFailure), and the crash-test failpoints."""

from __future__ import annotations

import logging
import os
import signal
from typing import Final

from agent.fleet.lifecycle import Event

log = logging.getLogger("agent.fleet")

# Crash-safety tests make the agent SIGKILL itself at a named step of the life
# cycle: EDGE_AGENT_FAILPOINT=<name> or <name>:<deployment sequence>. Unset, as
# in production, this does nothing.
_FAILPOINT: Final = os.environ.get("EDGE_AGENT_FAILPOINT", "")


def failpoint(name: str, sequence: int) -> None:
    if _FAILPOINT and _FAILPOINT in (name, f"{name}:{sequence}"):
        log.warning("failpoint reached: killing the agent", extra={"failpoint": _FAILPOINT})
        os.kill(os.getpid(), signal.SIGKILL)


class JobFailure(Exception):
    """Ends the current job: FAIL / TIME_OUT before activation, ROLL_BACK in probation."""

    def __init__(self, reason: str, message: str, event: Event = Event.FAIL) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.event = event
