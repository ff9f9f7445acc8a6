#!/usr/bin/env python3
"""Send one SIP OPTIONS over UDP or TLS and print the reply (`make up` waits with it).

    sip_ping.py udp 127.0.0.1 5060
    sip_ping.py tls 127.0.0.1 5061 --ca run/certs/ca.pem
"""

from __future__ import annotations

import argparse
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


def ping_tls(host: str, port: int, timeout: float, ca: str | None) -> bytes:
    ctx = ssl.create_default_context(cafile=ca)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(options("tls", host, port, s.getsockname()))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65535)
            if not chunk:
                break
            data += chunk
        return data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("proto", choices=("udp", "tls"))
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--ca", help="CA file to verify the TLS server (default: no verification)")
    p.add_argument("--wait", type=float, default=0, help="retry for up to this many seconds")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    end = time.monotonic() + args.wait
    while True:
        try:
            if args.proto == "udp":
                reply = ping_udp(args.host, args.port, 1.0)
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
