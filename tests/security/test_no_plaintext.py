"""A TLS peer is never reached in plaintext: not by a reply whose hairpin has gone.

With the reference routing script: a TLS UA calls a UDP UA and leaves (close_notify) before the
answer. Kamailio must not deliver the 180/200 by opening a plain TCP connection to the address
the PROXY header declared (the UA's real address): that would put SIP in clear on the network.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.faults.lab import Lab, daemon_healthy, lab_stack, wait_closed_event
from tests.support.procs import CFG
from tests.support.sip import StreamFramer, TlsUA, UdpUA
from tests.support.ua import SipUA
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration]


def uniq(name: str) -> str:
    return f"{name}{time.monotonic_ns() % 10**9}"


def reusable_tls_ua(lab: Lab) -> TlsUA:
    """A TLS UA whose port can be listened on once it is gone (SO_REUSEADDR before connect, as
    UAs that send from their listening port do): the trap below must really get that port."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    raw.bind(("127.0.0.1", 0))
    raw.settimeout(5)
    raw.connect(lab.tls_addr)
    ua = TlsUA.__new__(TlsUA)
    ua.sock = ssl.create_default_context(cafile=lab.ca).wrap_socket(
        raw, server_hostname="localhost")
    ua.framer, ua.queue, ua.timeout = StreamFramer(), [], 5.0
    return ua


def test_replies_to_a_gone_tls_peer_never_go_out_in_plaintext(
    tmp_path: Path, fault_certs: dict[str, Path]
) -> None:
    with lab_stack(tmp_path, fault_certs, script=CFG / "routing.py") as lab:
        callee = SipUA(uniq("bob"), domain="localhost", proxy=("127.0.0.1", lab.sip_port),
                       udp=UdpUA())
        caller = SipUA(uniq("alice"), domain="localhost", proxy=lab.tls_addr,
                       tls=reusable_tls_ua(lab))
        trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            assert callee.register().status == 200
            host, port = caller.local
            caller.invite(f"sip:{callee.user}@127.0.0.1:{lab.sip_port}")
            invite = callee.expect(method="INVITE")
            assert caller.read().status == 100
            # The caller leaves cleanly before any answer.
            assert caller.tls is not None
            caller.tls.sock.unwrap().close()
            wait_closed_event(lab, format_addr(host, port))
            # A plaintext listener where the caller was: Kamailio must never connect to it.
            trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for _ in range(50):
                try:
                    trap.bind((host, port))
                    break
                except OSError:
                    time.sleep(0.1)
            assert trap.getsockname()[1] == port, "the trap could not take the caller's port"
            trap.listen(8)
            trap.settimeout(3)
            callee.reply(invite, 180, "Ringing", to_tag="t1")
            time.sleep(0.05)
            callee.reply(invite, 200, "OK", to_tag="t1")
            try:
                leak, _ = trap.accept()
            except TimeoutError:
                leak = None
            if leak is not None:
                leak.settimeout(2)
                try:
                    data = leak.recv(4096)
                except OSError:
                    data = b""
                leak.close()
                pytest.fail(f"Kamailio opened a plaintext TCP connection to the TLS peer's "
                            f"address {host}:{port} and sent: {data[:200]!r}")
            daemon_healthy(lab)
        finally:
            trap.close()
            callee.close()
            caller.close()
