"""Outbound TLS to trunks and sips: destinations through the real Kamailio and daemon: verified,
reused, per identity, and never blocking a SIP worker."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.support.procs import Daemon, free_tcp_udp_port, wait_until
from tests.support.sip import UdpUA, build_request
from tests.support.trunk import SilentServer, TlsTrunk, TrunkConn
from tests.support.ua import SipUA
from tlsbridge.shared import events as ev

pytestmark = [pytest.mark.integration]


class Blackhole:
    """A TCP port on loopback where connects hang: its accept queue is full and never drained,
    so the kernel drops every further SYN (the client retransmits, and waits)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fill: list[socket.socket] = []
        while True:  # until a connect no longer completes
            c = socket.socket()
            c.settimeout(0.3)
            try:
                c.connect(("127.0.0.1", self.port))
            except TimeoutError:
                c.close()
                break
            self.fill.append(c)
            assert len(self.fill) < 64, "the accept queue never filled"

    def close(self) -> None:
        for c in self.fill:
            c.close()
        self.listener.close()


class World:
    def __init__(self, tmp: Path, certs: dict[str, Path], engine: str) -> None:
        base = engine.partition("-x")[0].partition("-native")[0]
        ca = trustme.CA()
        ca.cert_pem.write_to_path(tmp / "trunk-ca.pem")
        good = ca.issue_cert("trunk.example.test", "alt.example.test", "127.0.0.1")
        bad = ca.issue_cert("other.example.test")
        tenant = ca.issue_cert("tenant2.example.test")
        for name, cert in (("good", good), ("bad", bad), ("tenant", tenant)):
            cert.cert_chain_pems[0].write_to_path(tmp / f"{name}.pem")
            cert.private_key_pem.write_to_path(tmp / f"{name}.key")
        self.good = TlsTrunk(tmp / "good.pem", tmp / "good.key", client_ca=tmp / "trunk-ca.pem")
        self.bad = TlsTrunk(tmp / "bad.pem", tmp / "bad.key")
        self.silent = [SilentServer() for _ in range(20)]
        self.down_port = free_tcp_udp_port()
        self.blackhole = Blackhole()
        extra = f"""
[outbound]
connect_timeout = 2.5

[client.default]
ca_list = "{tmp / 'trunk-ca.pem'}"
engine = "{engine}"

[client.tenant1]
engine = "{engine}"
ca_list = "{tmp / 'trunk-ca.pem'}"

[client.tenant2]
engine = "{engine}"
ca_list = "{tmp / 'trunk-ca.pem'}"
certificate = "{tmp / 'tenant.pem'}"
private_key = "{tmp / 'tenant.key'}"

[trunk.good]
address = "127.0.0.1:{self.good.port}"
sni = "trunk.example.test"
prefixes = ["+49"]

[trunk.badname]
address = "127.0.0.1:{self.bad.port}"
sni = "trunk.example.test"
prefixes = ["+33"]

[trunk.down]
address = "127.0.0.1:{self.down_port}"
sni = "trunk.example.test"
prefixes = ["+44"]

[trunk.blackhole]
address = "127.0.0.1:{self.blackhole.port}"
sni = "trunk.example.test"
prefixes = ["+39"]

[trunk.restart]  # a connection of its own, for the daemon restart test
address = "127.0.0.1:{self.good.port}"
sni = "alt.example.test"
prefixes = ["+86"]

[trunk.tenant_a]
address = "127.0.0.1:{self.good.port}"
sni = "alt.example.test"
client = "tenant1"
prefixes = ["+63"]

[trunk.tenant_b]
address = "127.0.0.1:{self.good.port}"
sni = "alt.example.test"
client = "tenant2"
prefixes = ["+62"]
"""
        self.stack = start_stack(tmp, certs, extra=extra.replace(f'"{engine}"', f'"{base}"'),
                                 engine=engine)

    def close(self) -> None:
        stop_stack(self.stack)
        self.good.close()
        self.bad.close()
        self.blackhole.close()
        for s in self.silent:
            s.close()


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path], engine: str
) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp(f"outbound-{engine}"), certs, engine)
    yield w
    w.close()


def udp_ua(stack: Stack, user: str) -> SipUA:
    return SipUA(user, domain="localhost", proxy=("127.0.0.1", stack.sip_port), udp=UdpUA())


def call_over_trunk(world: World, caller: SipUA, number: str, conns: int) -> TrunkConn:
    """A call to `number`, answered and then hung up by the caller, which the good trunk
    receives on its `conns`-th connection (returned)."""
    stack = world.stack
    d = caller.invite(f"sip:{number}@127.0.0.1:{stack.sip_port}")
    conn = world.good.wait_conn(conns)
    trunk = SipUA("trunk", domain="trunk.example.test", proxy=stack.tls_addr, tls=conn)
    trunk.answer()
    caller.wait_answer(d)
    trunk.expect(method="ACK")
    caller.bye(d)
    trunk.take_bye()
    caller.expect(status=200)
    return conn


def test_udp_ua_calls_a_tls_trunk_and_the_trunk_hangs_up(world: World) -> None:
    stack = world.stack
    caller = udp_ua(stack, "alice")
    try:
        d_caller = caller.invite(f"sip:+4930123456@127.0.0.1:{stack.sip_port}")
        conn = world.good.wait_conn(1)
        assert conn.sni == "trunk.example.test"
        trunk = SipUA("trunk", domain="trunk.example.test", proxy=stack.tls_addr, tls=conn)
        d_trunk, invite = trunk.answer()
        assert invite.first_line.startswith("INVITE sip:+4930123456@")
        caller.wait_answer(d_caller)
        trunk.expect(method="ACK")
        # The trunk hangs up: the BYE finds its way back to the UDP caller.
        trunk.bye(d_trunk)
        caller.take_bye()
        assert trunk.expect(status=200).get("CSeq").endswith("BYE")
        ready = stack.events.wait_for(lambda e: e.type == ev.OUTBOUND_READY)
        assert ready.conn is not None and ready.conn.direction == "out"
        assert ready.tls is not None and ready.tls.peer is not None
        assert "trunk.example.test" in ready.tls.peer.san_dns
        # A second call reuses the connection.
        d2 = caller.invite(f"sip:+4930999@127.0.0.1:{stack.sip_port}")
        d_trunk2, _ = trunk.answer()
        caller.wait_answer(d2)
        trunk.expect(method="ACK")
        caller.bye(d2)
        trunk.take_bye()
        caller.expect(status=200)
        assert len(world.good.conns) == 1
        del d_trunk2
    finally:
        caller.close()


def test_trunk_with_a_wrong_certificate_gets_not_one_byte(world: World) -> None:
    stack = world.stack
    caller = udp_ua(stack, "bob")
    try:
        start = time.monotonic()
        caller.invite(f"sip:+33145678@127.0.0.1:{stack.sip_port}")
        final = caller.expect(status=503, timeout=6)
        assert time.monotonic() - start < 4
        assert "verify_failed" in final.first_line
        failed = stack.events.wait_for(lambda e: e.type == ev.OUTBOUND_FAILED
                                       and e.fields["target"]["port"] == world.bad.port)
        assert failed.reason == "verify_failed"
        assert world.bad.handshake_errors and not world.bad.conns
        assert world.bad.app_bytes_before_close == [0]
    finally:
        caller.close()


def test_trunk_refusing_fails_at_once(world: World) -> None:
    stack = world.stack
    caller = udp_ua(stack, "carol")
    try:
        start = time.monotonic()
        caller.invite(f"sip:+4420794@127.0.0.1:{stack.sip_port}")
        final = caller.expect(status=503, timeout=6)
        assert time.monotonic() - start < 1.5  # refused: no waiting for the timeout
        assert "connect_failed" in final.first_line
        failed = stack.events.wait_for(lambda e: e.type == ev.OUTBOUND_FAILED
                                       and e.fields["target"]["port"] == world.down_port)
        assert failed.reason == "connect_failed", failed.fields
    finally:
        caller.close()


def test_trunk_unreachable_fails_within_the_connect_timeout(world: World) -> None:
    """The trunk's TCP connect hangs (SYNs dropped): the call fails when `[outbound]
    connect_timeout` (2.5 s here) runs out, not sooner, not much later."""
    stack = world.stack
    caller = udp_ua(stack, "carl")
    try:
        start = time.monotonic()
        caller.invite(f"sip:+3906123@127.0.0.1:{stack.sip_port}")
        final = caller.expect(status=503, timeout=8)
        took = time.monotonic() - start
        assert 2.5 * 0.9 <= took < 2.5 + 1.5, f"failed after {took:.2f} s"
        assert "timeout" in final.first_line, final.first_line
        failed = stack.events.wait_for(lambda e: e.type == ev.OUTBOUND_FAILED
                                       and e.fields["target"]["port"] == world.blackhole.port)
        assert failed.reason == "timeout", failed.fields
    finally:
        caller.close()


def test_two_tenants_to_one_trunk_get_their_own_connections(world: World) -> None:
    """Trunks `tenant_a` and `tenant_b`: the same server, the same SNI, two client profiles
    (tenant2 presents a certificate, tenant1 none). Each gets its own connection, declared to
    Kamailio under a source of its own."""
    stack = world.stack
    caller = udp_ua(stack, "dave")
    try:
        before = len(world.good.conns)
        first = call_over_trunk(world, caller, "+6312345", before + 1)  # trunk.tenant_a
        second = call_over_trunk(world, caller, "+6212345", before + 2)  # trunk.tenant_b
        assert first is not second
        assert first.sni == second.sni == "alt.example.test"
        # The trunk saw one connection without a client certificate, one with tenant2's.
        subjects = world.good.client_subjects[before:before + 2]
        assert not subjects[0], subjects[0]
        assert "tenant2.example.test" in str(subjects[1]), subjects[1]
        listed = stack.daemon.request("list")["conns"]
        outs = [c for c in listed if c["conn"]["direction"] == "out"
                and c["tls"]["sni"] == "alt.example.test"]
        assert len(outs) == 2, outs
        assert len({c["conn"]["peer"] for c in outs}) == 2, [c["conn"] for c in outs]
        assert len({c["conn"]["hairpin"] for c in outs}) == 2, [c["conn"] for c in outs]
        # A second call of the tenant reuses its own connection.
        call_over_trunk(world, caller, "+6299999", before + 2)
        assert len(world.good.conns) == before + 2
    finally:
        caller.close()


def test_hanging_connects_do_not_delay_other_calls(world: World) -> None:
    stack = world.stack
    callee = udp_ua(stack, "erin")
    assert callee.register().status == 200
    stop = threading.Event()

    def busy() -> None:  # the callee answers every INVITE with 486 at once
        while not stop.is_set():
            try:
                msg = callee.read(0.2)
            except OSError:
                continue
            if not msg.is_reply and msg.method == "INVITE":
                callee.reply(msg, 486, "Busy Here", to_tag="b")

    threading.Thread(target=busy, daemon=True).start()
    caller = UdpUA()
    proxy = ("127.0.0.1", stack.sip_port)

    def call_latency() -> float:
        t0 = time.monotonic()
        caller.send(build_request("INVITE", f"sip:erin@127.0.0.1:{stack.sip_port}",
                                  via_proto="UDP", local=caller.local), proxy)
        while True:
            reply = caller.read(5)
            if reply.status >= 200:
                assert reply.status == 486
                return time.monotonic() - t0

    hangers = [udp_ua(stack, f"h{i}") for i in range(len(world.silent))]
    try:
        baseline = [call_latency() for _ in range(30)]
        for ua, silent in zip(hangers, world.silent, strict=True):
            ua.invite(f"sips:x@127.0.0.1:{silent.port}")
        wait_until(lambda: all(s.held for s in world.silent), 5,
                   "every silent server to hold the daemon's connection")
        loaded = [call_latency() for _ in range(200)]
        # Everything happened while the 20 TLS handshakes were hanging (2.5 s).
        assert all(s.held for s in world.silent)
        assert max(loaded) < 0.25, max(loaded)
        assert statistics.median(loaded) < statistics.median(baseline) * 3 + 0.01
        for ua in hangers:
            final = ua.expect(status=503, timeout=6)
            assert "timeout" in final.first_line
    finally:
        stop.set()
        for ua in hangers:
            ua.close()
        caller.close()
        callee.close()


def test_idle_outbound_connections_close(tmp_path: Path, certs: dict[str, Path]) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca2.pem")
    leaf = ca.issue_cert("idle.example.test")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "idle.pem")
    leaf.private_key_pem.write_to_path(tmp_path / "idle.key")
    trunk = TlsTrunk(tmp_path / "idle.pem", tmp_path / "idle.key")
    stack = start_stack(tmp_path, certs, extra=f"""
[outbound]
idle_timeout = 1.0

[client.default]
ca_list = "{tmp_path / 'ca2.pem'}"
""")
    try:
        reply = stack.daemon.request("connect", host="127.0.0.1", port=trunk.port,
                                     sni="idle.example.test", tag="t1")
        assert reply["state"] == "pending"
        ready = stack.events.wait_for(lambda e: e.type == ev.OUTBOUND_READY)
        assert ready.fields["tags"] == ["t1"]
        again = stack.daemon.request("connect", host="127.0.0.1", port=trunk.port,
                                     sni="idle.example.test", tag="t2")
        assert again["state"] == "ready"  # reused
        closed = stack.events.wait_for(lambda e: e.type == ev.CONN_CLOSED
                                       and e.conn.id == ready.conn.id, timeout=5)
        assert closed.reason == "idle_timeout"
        assert closed.fields["keys"] == [ready.fields["key"]]
    finally:
        stop_stack(stack)
        trunk.close()


def test_calls_to_a_trunk_after_the_daemon_crashed_and_restarted(world: World) -> None:
    """Kamailio runs on while the daemon is killed (SIGKILL: no conn.closed for its outbound
    connections) and started again: the next call dials the trunk anew instead of taking the
    dead daemon's connection from htable (which failed with a 477 for good)."""
    stack = world.stack
    caller = udp_ua(stack, "dora")
    try:
        # A new connection: the daemon's o: key in htable.
        call_over_trunk(world, caller, "+8610555", len(world.good.conns) + 1)
        before = len(world.good.conns)
        assert stack.kamailio is not None
        assert "o:" in stack.kamailio.kamcmd("htable.dump", "tlsb")  # the o: key is there
        old_srcs = {e.src for e in stack.events.events}
        config, old = stack.daemon.config, stack.daemon
        os.killpg(old.popen.pid, signal.SIGKILL)
        old.stop()
        stack.daemon = Daemon(config.parent, config)
        stack.daemon.wait_ready()
        # The rtimer reconnects and is greeted with daemon.started; it polls every 50 ms.
        stack.events.wait_for(lambda e: e.type == ev.DAEMON_STARTED and e.src not in old_srcs,
                              timeout=5)
        # ...and clears htable tlsb of the dead daemon's connections.
        wait_until(lambda: "o:" not in stack.kamailio.kamcmd("htable.dump", "tlsb"), 5,
                   "Kamailio's rtimer to forget the dead daemon's connections")
        call_over_trunk(world, caller, "+8610555", before + 1)
    finally:
        caller.close()

