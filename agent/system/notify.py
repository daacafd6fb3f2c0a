"""sd_notify: tell systemd (or a test standing in for it) how the service is doing.

No-op when NOTIFY_SOCKET is unset, so the agent runs the same outside systemd.
Messages are sent from the caller's thread; the agent sends them from its event
loop only, so a blocked loop sends nothing (which is what the watchdog needs).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

# A full or vanished notification socket must not hold up the event loop for long.
_SEND_TIMEOUT_S = 1.0


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(_SEND_TIMEOUT_S)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        if self._sock is None:
            return
        # systemd gone or its socket full: nothing useful to do about it.
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), self._address)

    def status(self, text: str) -> None:
        """One line for ``systemctl status`` (newlines would end the field)."""
        self.notify("STATUS=" + " ".join(text.split()))

    def reloading(self, status: str) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd asks for."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=" + " ".join(status.split()))

    def watchdog_interval(self) -> float | None:
        """Half of WatchdogSec (systemd's advice), if the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6
