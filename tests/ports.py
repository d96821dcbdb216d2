"""A free TCP port on the loopback address, for launchers started by tests (``deepspeed``'s default 29500 would be
shared by tests running side by side under pytest-xdist)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
