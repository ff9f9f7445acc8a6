"""A small SIP user agent for tests: builds requests, frames a TCP/TLS stream, parses messages."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class SipMessage:
    first_line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_reply(self) -> bool:
        return self.first_line.startswith("SIP/2.0 ")

    @property
    def status(self) -> int:
        return int(self.first_line.split()[1]) if self.is_reply else 0

    @property
    def method(self) -> str:
        return self.first_line.split()[0] if not self.is_reply else self.get("CSeq").split()[1]

    def get(self, name: str, default: str = "") -> str:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_message(data: bytes) -> SipMessage:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    return SipMessage(lines[0], headers, body)


class StreamFramer:
    """Splits a SIP byte stream into messages by Content-Length."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            m = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", self.buf[:end])
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < total:
                return out
            out.append(self.buf[:total])
            self.buf = self.buf[total:]


def build_request(
    method: str,
    ruri: str,
    *,
    via_proto: str,
    local: tuple[str, int],
    from_uri: str = "sip:tester@localhost",
    to_uri: str | None = None,
    call_id: str | None = None,
    cseq: int = 1,
    extra: list[str] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/{via_proto} {local[0]}:{local[1]}"
        f";branch=z9hG4bK-{uuid.uuid4().hex[:12]};rport",
        f"From: <{from_uri}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <{to_uri or ruri}>",
        f"Call-ID: {call_id or uuid.uuid4().hex}",
        f"CSeq: {cseq} {method}",
        "Max-Forwards: 70",
        *(extra or []),
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class TlsUA:
    """A SIP UA on one TLS connection (Python's ssl)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca: str,
        server_hostname: str | None = "localhost",
        tls_version: ssl.TLSVersion | None = None,
        ciphers: str | None = None,
        timeout: float = 5.0,
        cert: str | None = None,
        key: str | None = None,
        source: str | None = None,
    ) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        if server_hostname is None:
            ctx.check_hostname = False
        if tls_version is not None:
            ctx.minimum_version = ctx.maximum_version = tls_version
        if ciphers:
            ctx.set_ciphers(ciphers)
        # SO_REUSEADDR so that a test can listen on this address once it is closed (the
        # TIME_WAIT left behind only yields to sockets that both asked for reuse).
        raw = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.settimeout(timeout)
        try:
            if source is not None:  # another loopback address: no other test socket uses it
                raw.bind((source, 0))
            raw.connect((host, port))
        except OSError:
            raw.close()
            raise
        self._adopt(ctx.wrap_socket(raw, server_hostname=server_hostname), timeout)

    def _adopt(self, sock: ssl.SSLSocket, timeout: float) -> None:
        self.sock = sock
        self.framer = StreamFramer()
        self.queue: list[bytes] = []
        self.timeout = timeout

    @classmethod
    def accepted(cls, sock: ssl.SSLSocket, timeout: float = 5.0) -> TlsUA:
        """The server end of a TLS connection (a trunk), with the same interface."""
        ua = cls.__new__(cls)
        ua._adopt(sock, timeout)
        return ua

    @property
    def local(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, ruri: str, **kw: object) -> SipMessage:
        self.send(build_request(method, ruri, via_proto="TLS", local=self.local, **kw))
        return self.read()

    def read(self, timeout: float | None = None) -> SipMessage:
        end = time.monotonic() + (timeout or self.timeout)
        while not self.queue:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no SIP message")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.queue.extend(self.framer.feed(data))
        return parse_message(self.queue.pop(0))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class UdpUA:
    def __init__(self, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(timeout)

    @property
    def local(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(data, to)

    def read(self, timeout: float | None = None) -> SipMessage:
        if timeout is not None:
            self.sock.settimeout(timeout)
        data, _ = self.sock.recvfrom(65536)
        return parse_message(data)

    def close(self) -> None:
        self.sock.close()
