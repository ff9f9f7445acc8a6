#!/usr/bin/env python3
"""Send one SIP OPTIONS over UDP or TLS and print the reply (`make up` waits with it).

    sip_ping.py udp 127.0.0.1 5060
    sip_ping.py tls 127.0.0.1 5061 --ca run/certs/ca.pem
    sip_ping.py wss 127.0.0.1 8443 --ca run/certs/ca.pem --origin http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import ssl
import sys
import time
import uuid


def options(proto: str, host: str, port: int, local: tuple[str, int]) -> bytes:
    branch = "z9hG4bK-" + uuid.uuid4().hex[:16]
    return (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{proto.upper()} {local[0]}:{local[1]};branch={branch};rport\r\n"
        f"From: <sip:ping@{local[0]}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{host}:{port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def ping_udp(host: str, port: int, timeout: float) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(options("udp", host, port, s.getsockname()))
        return s.recv(65535)


def _context(ca: str | None) -> ssl.SSLContext:
    """Verifies the server against `ca`; without one, verifies nothing (a smoke test)."""
    ctx = ssl.create_default_context(cafile=ca)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def ping_tls(host: str, port: int, timeout: float, ca: str | None) -> bytes:
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        _context(ca).wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(options("tls", host, port, s.getsockname()))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65535)
            if not chunk:
                break
            data += chunk
        return data


def ping_wss(host: str, port: int, timeout: float, ca: str | None, origin: str | None) -> bytes:
    """OPTIONS over secure WebSocket (RFC 7118), as a browser would send it (one masked text
    frame after the HTTP upgrade)."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        _context(ca).wrap_socket(raw, server_hostname=host) as s,
    ):
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n"
                   + (f"Origin: {origin}\r\n" if origin else "") + "\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65535)
            if not chunk:
                raise OSError("closed during the WebSocket upgrade")
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError(f"upgrade refused: {head.splitlines()[0].decode(errors='replace')}")
        payload = options("wss", host, port, s.getsockname()).replace(
            f"sip:{host}:{port}".encode(), f"sip:{host}:{port};transport=ws".encode())
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big") if n >= 126 else \
            bytes([0x81, 0x80 | n])
        s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        def need(k: int) -> None:
            nonlocal data
            while len(data) < k:
                chunk = s.recv(65535)
                if not chunk:
                    raise OSError("closed before the reply")
                data += chunk

        while True:  # one unmasked text frame back (a ping from the server is skipped)
            need(2)
            opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
            if n == 126:
                need(4)
                n, at = int.from_bytes(data[2:4], "big"), 4
            need(at + n)
            frame, data = data[at:at + n], data[at + n:]
            if opcode == 1:
                return frame


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("proto", choices=("udp", "tls", "wss"))
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--ca", help="CA file to verify the TLS server (default: no verification)")
    p.add_argument("--origin", help="wss: the Origin header (the listener's origins decide)")
    p.add_argument("--wait", type=float, default=0, help="retry for up to this many seconds")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    end = time.monotonic() + args.wait
    while True:
        try:
            if args.proto == "udp":
                reply = ping_udp(args.host, args.port, 1.0)
            elif args.proto == "wss":
                reply = ping_wss(args.host, args.port, 2.0, args.ca, args.origin)
            else:
                reply = ping_tls(args.host, args.port, 2.0, args.ca)
            if not reply.startswith(b"SIP/2.0 "):
                raise OSError(f"not a SIP reply: {reply[:40]!r}")
            break
        except OSError as exc:
            if time.monotonic() >= end:
                print(f"sip_ping: {args.proto}:{args.host}:{args.port}: {exc}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    if not args.quiet:
        sys.stdout.write(reply.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
