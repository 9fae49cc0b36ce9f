"""A stand-in for systemd's notify socket: it receives what the service tells systemd."""

from __future__ import annotations

import socket
import time


class NotifySocket:
    """What systemd listens on: one datagram per message."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def read_until(self, key: str, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in raw.decode().splitlines())
            self.messages.append(message)
            if key in message:
                return message
        raise AssertionError(f"no {key} in {self.messages}")
