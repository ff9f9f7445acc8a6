"""A listening socket the daemon accepts on itself, for connections whose TLS runs on their
own socket (engines/openssl_socket.py): asyncio's servers hand out transports, and OpenSSL
needs the fd.

It binds as `loop.create_server` does (every address of the host, SO_REUSEADDR and
SO_REUSEPORT, IPv6 only on IPv6 sockets), and backs off for a second when the process is out
of descriptors, as asyncio does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tlsbridge")

ACCEPTS_PER_WAKE = 64
RETRY_DELAY = 1.0
# Out of a resource for every connection: accepting again at once would spin.
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class SocketListener:
    """Calls `on_accept(sock, peer)` with each accepted, non-blocking TCP socket."""

    def __init__(self, socks: list[socket.socket],
                 on_accept: Callable[[socket.socket, Any], None]) -> None:
        self._socks = socks
        self._on_accept = on_accept
        self._loop = asyncio.get_running_loop()
        for sock in socks:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @classmethod
    def bind(cls, host: str, port: int, on_accept: Callable[[socket.socket, Any], None], *,
             backlog: int = 4096) -> SocketListener:
        """Raises OSError when an address cannot be bound (nothing stays open then)."""
        socks: list[socket.socket] = []
        try:
            for family, type_, proto, _name, addr in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                sock = socket.socket(family, type_, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        return cls(socks, on_accept)

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._socks)

    def _accept(self, lsock: socket.socket) -> None:
        family = lsock.family
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                # socket.accept() converts family and type to enums per connection
                fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # gone before we took it
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    raise
                log.error("cannot accept on %s: %s; retrying in %g s",
                          lsock.getsockname(), exc.strerror, RETRY_DELAY)
                self._loop.remove_reader(lsock.fileno())
                self._loop.call_later(RETRY_DELAY, self._resume, lsock)
                return
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._on_accept(sock, peer)

    def _resume(self, lsock: socket.socket) -> None:
        if lsock in self._socks:
            self._loop.add_reader(lsock.fileno(), self._accept, lsock)

    def close(self) -> None:
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks = []
