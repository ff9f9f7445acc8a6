"""Serves the fast facts look-up (shared/lookup.py) on a UNIX datagram socket in the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from tlsbridge.shared.lookup import MAX_DATAGRAM, decode_request, encode_reply

log = logging.getLogger("tlsbridge")

# find(key) -> the JSON entry, None, or an awaitable of either (a supervisor asks its workers)
Finder = Callable[[str], "bytes | Awaitable[bytes | None] | None"]


class LookupServer:
    def __init__(self, path: str, find: Finder) -> None:
        self.path = path
        self.find = find
        self._sock: socket.socket | None = None
        self._pending: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o660)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # bounded: other work gets its turn
            try:
                data, addr = self._sock.recvfrom(512)
            except (BlockingIOError, InterruptedError):
                return
            try:
                rid, key = decode_request(data)
            except ValueError:
                continue  # not ours: ignore, as a datagram service does
            found = self.find(key)
            if found is None or isinstance(found, bytes):
                self._answer(addr, rid, found)
            else:
                task = asyncio.ensure_future(self._answer_later(addr, rid, found))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def _answer_later(self, addr: str, rid: int, found: Awaitable[bytes | None]) -> None:
        self._answer(addr, rid, await found)

    def _answer(self, addr: str, rid: int, entry: bytes | None) -> None:
        if self._sock is None or not addr:
            return
        reply = encode_reply(rid, entry)
        if len(reply) > MAX_DATAGRAM:
            reply = encode_reply(rid, None)
        try:
            self._sock.sendto(reply, addr)
        except OSError as exc:  # the asking worker is gone or not reading: its loss
            log.debug("look-up answer to %r dropped: %s", addr, exc)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
