"""The test suite's network guard: connections and name lookups may reach this machine only.

`install(record)` patches socket.connect/connect_ex and getaddrinfo; a refused attempt is passed to
`record` (the pytest fixture fails the test with it) and raises, so nothing leaves the machine.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "", socket.gethostname().lower()}


class NetworkBlocked(RuntimeError):
    """Raised for any attempt to reach another machine during the tests."""


def is_local(host) -> bool:
    if host is None or str(host).lower() in LOCAL_NAMES:
        return True
    try:
        addr = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False  # a remote host name
    return addr.is_loopback or addr.is_unspecified


ATTEMPTS: list[str] = []  # what was refused, for the pytest fixture to report (one list per process)


def install(record: Callable[[str], None] = ATTEMPTS.append) -> Callable[[], None]:
    """Patch the socket module once per process (a second call changes nothing); returns a function that undoes it."""
    if getattr(socket.socket.connect, "netguard", False):
        return lambda: None
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(sock, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
            record(f"connect to {address[0]}:{address[1]}")
            raise NetworkBlocked(f"the tests may not reach {address[0]} (network guard, tests/conftest.py)")

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not is_local(host.decode() if isinstance(host, bytes) else host):
            record(f"name lookup of {host}")
            raise NetworkBlocked(f"the tests may not look up {host} (network guard, tests/conftest.py)")
        return real_getaddrinfo(host, *args, **kwargs)

    connect.netguard = True  # type: ignore[attr-defined]
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo

    def undo() -> None:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (real_connect, real_connect_ex,
                                                                             real_getaddrinfo)
    return undo
