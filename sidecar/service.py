"""Telling systemd how the service is doing, with the sd_notify protocol spoken directly (one
datagram per message on $NOTIFY_SOCKET; no libsystemd): READY once the listeners are bound and
the local models loaded, EXTEND_TIMEOUT while a load runs long, STATUS lines a person reads in
`systemctl status`, RELOADING and STOPPING, and watchdog pings sent from the event loop, so a
wedged loop stops them and systemd restarts the service. Outside systemd it does nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("sidecar")

# While a model loads, systemd is asked for this much more start-up time, this often.
EXTEND_S = 30.0
EXTEND_EVERY_S = 10.0


class Notifier:
    __slots__ = ("_address", "_failed", "_socket", "is_ready", "watchdog_s")

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket, which Linux spells with a leading NUL byte.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket: socket.socket | None = None
        self._failed = False
        self.is_ready = False  # READY=1 was sent
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        # Pings at half the interval systemd asked for, when the pings are for this process.
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours \
            else 0.0

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: object) -> None:
        """One message (`READY=1`, `STATUS=...`); a socket that refuses it is logged once."""
        if self._socket is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd's notify socket refused a message",
                            extra={"fields": {"error": exc.strerror}})

    def ready(self, status: str) -> None:
        self.is_ready = True
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                  // 1000, STATUS="reloading")

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def watchdog(notifier: Notifier) -> None:
    """Ping from the event loop itself: if the loop is stuck, the pings stop."""
    while True:
        notifier.send(WATCHDOG=1)
        await asyncio.sleep(notifier.watchdog_s)


async def announce_ready(notifier: Notifier, loading: Callable[[], list[str]],
                         serving: str) -> None:
    """READY=1 once nothing is loading; until then, say what loads and ask for more time."""
    extended = 0.0
    while names := loading():
        now = time.monotonic()
        if now - extended >= EXTEND_EVERY_S:
            extended = now
            notifier.send(EXTEND_TIMEOUT_USEC=int(EXTEND_S * 1e6),
                          STATUS=f"loading {', '.join(names)}")
        await asyncio.sleep(0.2)
    notifier.ready(serving)
