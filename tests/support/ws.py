"""A minimal SIP-over-WebSocket client (RFC 6455 framing, RFC 7118 `sip` subprotocol) over TLS,
for tests that need no browser: the upgrade's answer, OPTIONS and REGISTER over WSS."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import ssl
import struct
import time
import uuid

from tests.support.sip import SipMessage, parse_message
from tests.support.ua import SDP, SipUA

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeRefused(Exception):
    def __init__(self, status: int, head: str) -> None:
        super().__init__(f"upgrade answered {status}: {head!r}")
        self.status, self.head = status, head


class WssClient:
    def __init__(self, host: str, port: int, *, ca: str, origin: str | None = "https://test",
                 path: str = "/", timeout: float = 5.0, protocol: str = "sip",
                 source: str | None = None) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        raw = socket.create_connection((host, port), timeout=timeout,
                                       source_address=(source, 0) if source else None)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.timeout = timeout
        self._buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Protocol: {protocol}"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n").decode(errors="replace")
        status = int(head.split(" ", 2)[1])
        if status != 101:
            self.close()
            raise HandshakeRefused(status, head)
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        assert f"sec-websocket-accept: {accept.lower()}" in head.lower(), head

    @property
    def local(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def _read_until(self, marker: bytes) -> bytes:
        end = time.monotonic() + self.timeout
        while marker not in self._buf:
            if time.monotonic() > end:
                raise TimeoutError(f"no {marker!r} within {self.timeout} s")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head + marker

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no WebSocket frame in time") from None
            if not chunk:
                raise ConnectionError("closed by the server")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def send_text(self, text: str | bytes, opcode: int = 1) -> None:
        payload = text.encode() if isinstance(text, str) else text
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def recv_text(self, timeout: float | None = None) -> bytes:
        """The next text or binary message; pings are answered, pongs skipped."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            b0, b1 = self._read_exact(2, deadline)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read_exact(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read_exact(8, deadline))[0]
            mask = self._read_exact(4, deadline) if b1 & 0x80 else b""
            payload = self._read_exact(n, deadline)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 9:
                self.send_text(payload, opcode=10)
            elif opcode == 8:
                raise ConnectionError("WebSocket closed by the server")
            elif opcode in (1, 2):
                return payload

    def request(self, text: str, timeout: float | None = None) -> SipMessage:
        self.send_text(text)
        return self.read(timeout)

    def read(self, timeout: float | None = None) -> SipMessage:
        return parse_message(self.recv_text(timeout))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class WsSipUA(SipUA):
    """A SIP UA on one WebSocket, written like a browser's: `.invalid` Contact host,
    `Via: SIP/2.0/WSS`, `;transport=ws` (RFC 7118)."""

    def __init__(self, user: str, *, domain: str, ws: WssClient) -> None:
        self.user, self.domain, self.ws = user, domain, ws
        self.tls = self.udp = None
        self.proxy = ws.local
        self.proto = "WSS"
        self.pending: list[SipMessage] = []
        self.sdp = SDP
        self.host = f"{uuid.uuid4().hex[:12]}.invalid"

    @property
    def local(self) -> tuple[str, int]:
        return self.ws.local

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{self.host};transport=ws"

    def via(self, branch: str | None = None) -> str:
        return f"SIP/2.0/WSS {self.host};branch={branch or 'z9hG4bK-' + uuid.uuid4().hex[:16]}"

    def send(self, text: str, body: bytes = b"") -> None:
        self.ws.send_text(text.encode() + body)

    def read(self, timeout: float = 5.0) -> SipMessage:
        if self.pending:
            return self.pending.pop(0)
        return self.ws.read(timeout)

    def close(self) -> None:
        self.ws.close()
