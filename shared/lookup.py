"""The fast facts look-up: one UNIX datagram each way, no ZeroMQ threads on either side.

A Kamailio worker whose message beat its event to htable asks the daemon directly. The answer
is the same JSON entry the rtimer process stores in htable: `{"conn": {...}, "tls": {...}}`.

Request: `Q` + request id (4 bytes) + the hairpin key (ASCII).
Reply:   `A` + request id + `1` and the JSON entry, or `0` (no such connection).
"""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

_ID = struct.Struct("!I")
MAX_DATAGRAM = 256 * 1024


def encode_json_entry(conn: Mapping[str, Any], tls: Mapping[str, Any] | None) -> bytes:
    """The JSON entry of one connection, as the daemon answers a look-up and the KEMI module
    stores it in htable: `{"conn": ConnRef.to_dict(), "tls": TlsFacts.to_dict()}`."""
    return json.dumps({"conn": conn, "tls": tls}, separators=(",", ":")).encode()


def decode_json_entry(raw: bytes | str) -> dict[str, Any]:
    """The entry's map; ValueError if it is not one."""
    entry = json.loads(raw)
    if not isinstance(entry, dict):
        raise ValueError(f"a facts entry is a JSON object, not {type(entry).__name__}")
    return entry


class LookupUnavailable(Exception):
    """No answer: no daemon at the socket, or none within the timeout."""


def encode_request(rid: int, key: str) -> bytes:
    return b"Q" + _ID.pack(rid & 0xFFFFFFFF) + key.encode("ascii")


def decode_request(data: bytes) -> tuple[int, str]:
    if len(data) < 6 or data[:1] != b"Q" or len(data) > 300:
        raise ValueError("not a look-up request")
    return _ID.unpack_from(data, 1)[0], data[5:].decode("ascii")


def encode_reply(rid: int, entry: bytes | None) -> bytes:
    head = b"A" + _ID.pack(rid & 0xFFFFFFFF)
    return head + (b"1" + entry if entry is not None else b"0")


def decode_reply(data: bytes) -> tuple[int, bytes | None]:
    if len(data) < 6 or data[:1] != b"A" or data[5:6] not in (b"0", b"1"):
        raise ValueError("not a look-up reply")
    return _ID.unpack_from(data, 1)[0], (data[6:] if data[5:6] == b"1" else None)


class LookupClient:
    """Blocking, with a hard timeout; bound to an abstract address, so nothing to clean up.
    Create after fork (lazily)."""

    def __init__(self, path: str, timeout_ms: int) -> None:
        self.path = path
        self.timeout_ms = timeout_ms
        self._sock: socket.socket | None = None
        self._pid = 0
        self._ids = itertools.count(1)

    def _socket(self) -> socket.socket:
        if self._sock is None or self._pid != os.getpid():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(f"\0tlsbridge-lookup-{os.getpid()}-{id(self):x}")
            sock.setblocking(False)
            self._sock, self._pid = sock, os.getpid()
        return self._sock

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The entry for hairpin `key`, None if the daemon has none; raises LookupUnavailable."""
        sock = self._socket()
        rid = next(self._ids) & 0xFFFFFFFF
        try:
            sock.sendto(encode_request(rid, key), self.path)
        except OSError as exc:
            raise LookupUnavailable(f"{self.path}: {exc.strerror or exc}") from None
        end = time.monotonic() + self.timeout_ms / 1000
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise LookupUnavailable(f"no answer from {self.path} in {self.timeout_ms} ms")
            try:
                got, entry = decode_reply(sock.recv(MAX_DATAGRAM))
            except (BlockingIOError, ValueError):
                continue
            if got == rid:  # an older, timed-out request's answer is skipped
                return None if entry is None else decode_json_entry(entry)

    def close(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close()
        self._sock = None
