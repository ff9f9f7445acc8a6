"""kemi/bridge.py TlsBridge against the KSR stubs and an in-process fake daemon.

The fake daemon is real ZeroMQ on ipc:// paths under tmp_path: a ROUTER socket served by a
background thread speaking tlsbridge.shared.control, and a publisher of events encoded with
EventEncoder. The publisher is an XPUB (a PUB that also reports subscriptions) so a test can
wait until the bridge's SUB socket is subscribed instead of sleeping.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from tlsbridge.kemi import testing
from tlsbridge.kemi.bridge import HTABLE, BridgeConnection, TlsBridge
from tlsbridge.kemi.routing import Outcome
from tlsbridge.kemi.uri import parse_uri
from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev
from tlsbridge.shared import factsmap
from tlsbridge.shared.addr import target_key
from tlsbridge.shared.events import ConnRef, Event, EventEncoder
from tlsbridge.shared.facts import CertInfo, DistinguishedName, TlsFacts

HAIRPIN = ("127.0.0.1", 5062)
TIMEOUT_MS = 150
MARGIN_S = 0.15

# ---------------------------------------------------------------- facts and connections


def facts(sni: str = "sip.example.com", version: str = "TLSv1.3") -> TlsFacts:
    return TlsFacts.from_dict(
        {
            "version": version,
            "cipher": "TLS_AES_128_GCM_SHA256",
            "cipher_bits": 128,
            "sni": sni,
            "alpn": None,
            "resumed": False,
            "peer_cert_present": False,
            "peer_verified": False,
            "verify_error": "no peer certificate",
            "peer": None,
            "local": None,
            "engine": "openssl",
        }
    )


def _dn(cn: str) -> DistinguishedName:
    return DistinguishedName(
        line=f"CN={cn},O=Example", cn=cn, o="Example", ou=None, c=None, st=None, l=None,
        uid=None, email=None,
    )


CLIENT_CERT = CertInfo(
    subject=_dn("alice.example.com"),
    issuer=_dn("Example CA"),
    serial="1A2B",
    version=3,
    not_before="2025-01-01T00:00:00Z",
    not_after="2027-01-01T00:00:00Z",
    san_dns=("alice.example.com",),
    san_uri=("sip:alice@example.com",),
    san_email=(),
    san_ip=(),
    fingerprint_sha256=":".join(["AB"] * 32),
    pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    self_signed=False,
)
MTLS_FACTS = TlsFacts(
    version="TLSv1.2",
    cipher="ECDHE-ECDSA-AES256-GCM-SHA384",
    cipher_bits=256,
    sni=None,
    alpn="sip",
    resumed=False,
    peer_cert_present=True,
    peer_verified=True,
    verify_error=None,
    peer=CLIENT_CERT,
    local=None,
    engine="openssl",
)


def conn(n: int, *, peer_port: int | None = None, hairpin_port: int | None = None) -> ConnRef:
    """Connection number n: peer 198.51.100.7:(40000+n), hairpin 127.0.0.1:(41000+n)."""
    return ConnRef(
        id=n,
        peer=f"198.51.100.7:{peer_port or 40000 + n}",
        direction="in",
        hairpin=f"127.0.0.1:{hairpin_port or 41000 + n}",
        listener="192.0.2.1:5061",
    )


def entry(ref: ConnRef, tls: TlsFacts) -> dict[str, Any]:
    return {"conn": ref.to_dict(), "tls": tls.to_dict()}


def over_hairpin(ksr: testing.FakeKSR, ref: ConnRef, conid: int) -> None:
    """Set up the pseudo-variables of a message that came over ref's hairpin."""
    ksr.message(hairpin=HAIRPIN, peer=ref.peer, daemon=ref.hairpin, conid=conid)


# ---------------------------------------------------------------- the fake daemon


class FakeDaemon:
    """ROUTER socket answering control requests in a background thread."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.conns: dict[str, dict[str, Any]] = {}  # hairpin -> {"conn", "tls"}
        self.requests: list[ctl.Request] = []
        self.silent = False  # record requests, never answer
        self.hold_next = False  # answer the next request only when the one after it arrives
        self.stale: dict[str, Any] | None = None  # what the held request is answered with
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-daemon", daemon=True)

    def __enter__(self) -> FakeDaemon:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ctx.term()

    def add(self, ref: ConnRef, tls: TlsFacts) -> None:
        assert ref.hairpin
        self.conns[ref.hairpin] = entry(ref, tls)

    def ops(self) -> list[str]:
        return [r.op for r in self.requests]

    def _answer(self, body: bytes) -> bytes | None:
        try:
            req = ctl.decode_request(body)
        except ctl.ControlError as exc:
            return ctl.encode_error(ctl.peek_id(body), exc.code, exc.message)
        self.requests.append(req)
        if req.op == "ping":
            return ctl.encode_reply(req.rid, pong=True)
        if req.op == "list":
            return ctl.encode_reply(req.rid, conns=list(self.conns.values()))
        if req.op == "lookup":
            found = self.conns.get(req.args.get("hairpin"))
            if found is None:
                return ctl.encode_error(req.rid, ctl.NOT_FOUND, "no such hairpin")
            return ctl.encode_reply(req.rid, **found)
        return ctl.encode_error(req.rid, ctl.UNSUPPORTED, req.op)

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._ready.set()
        held: list[tuple[list[bytes], int]] = []
        try:
            while not self._stop.is_set():
                if not sock.poll(10):
                    continue
                frames = sock.recv_multipart()
                envelope, body = frames[:-1], frames[-1]
                reply = self._answer(body)
                if self.silent or reply is None:
                    continue
                if self.hold_next:
                    self.hold_next = False
                    held.append((envelope, ctl.peek_id(body)))
                    continue
                for old_envelope, old_id in held:
                    late = ctl.encode_reply(old_id, **(self.stale or {}))
                    sock.send_multipart([*old_envelope, late])
                held.clear()
                sock.send_multipart([*envelope, reply])
        finally:
            sock.close(linger=0)


class Publisher:
    """The daemon's event stream: an XPUB socket and an EventEncoder."""

    def __init__(self, endpoint: str, src: str = "daemon-1") -> None:
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.encoder = EventEncoder(src)

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()

    def wait_subscribed(self, timeout: float = 5.0) -> set[str]:
        """The topics subscribed to (they arrive together, one message each)."""
        assert self.sock.poll(int(timeout * 1000)), "the bridge never subscribed"
        topics = set()
        while self.sock.poll(100):
            msg = self.sock.recv()
            assert msg[:1] == b"\x01", msg
            topics.add(msg[1:].decode())
        return topics

    def publish(self, type_: str, ref: ConnRef | None = None, **fields: Any) -> Event:
        event, frames = self.encoder.encode(type_, ref, **fields)
        self.sock.send_multipart(frames)
        return event

    def skip(self, type_: str, ref: ConnRef | None = None) -> None:
        """Use up a sequence number of that topic without publishing: a lost event."""
        self.encoder.encode(type_, ref)

    def restart(self, src: str) -> None:
        self.encoder = EventEncoder(src)

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)


# ---------------------------------------------------------------- fixtures and helpers


def ipc(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    # AF_UNIX paths are limited to 107 bytes; pytest keeps tmp_path short unless --basetemp isn't.
    assert len(str(path).encode()) < 100, f"{path} is too long for an ipc:// endpoint"
    return f"ipc://{path}"


@pytest.fixture
def ksr() -> Iterator[testing.FakeKSR]:
    with testing.install() as fake:
        yield fake


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    with FakeDaemon(ipc(tmp_path, "control.sock")) as d:
        yield d


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Publisher]:
    pub = Publisher(ipc(tmp_path, "events.sock"))
    yield pub
    pub.close()


def close_bridge(bridge: TlsBridge) -> None:
    if bridge._client is not None:
        bridge._client.close()
    if bridge._sub is not None:
        bridge._sub.close(linger=0)
        bridge._sub = None


@pytest.fixture
def make_bridge(
    ksr: testing.FakeKSR, daemon: FakeDaemon, publisher: Publisher
) -> Iterator[Callable[..., TlsBridge]]:
    made: list[TlsBridge] = []

    def make(**kw: Any) -> TlsBridge:
        kw.setdefault("control", daemon.endpoint)
        kw.setdefault("events", publisher.endpoint)
        kw.setdefault("lookup_timeout_ms", TIMEOUT_MS)
        kw.setdefault("facts_in_htable", True)  # most tests here are about that path
        bridge = TlsBridge(hairpin=HAIRPIN, **kw)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        close_bridge(bridge)


@pytest.fixture
def bridge(make_bridge: Callable[..., TlsBridge]) -> TlsBridge:
    return make_bridge()


@pytest.fixture
def subscribed(bridge: TlsBridge, publisher: Publisher) -> TlsBridge:
    """The bridge with its event socket connected and subscribed (as after the first rtimer run)."""
    assert bridge.drain_events() == 1
    assert publisher.wait_subscribed() == bridge._topics()
    return bridge


def drain_until(bridge: TlsBridge, done: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while True:
        bridge.drain_events()
        if done():
            return
        assert time.monotonic() < end, f"condition not met; stats {bridge.stats}"
        time.sleep(0.002)


def drain_count(bridge: TlsBridge, events: int = 0, bad: int = 0) -> None:
    """Drain until the bridge has seen `events` good and `bad` bad events in total."""
    drain_until(
        bridge, lambda: bridge.stats["events"] >= events and bridge.stats["bad_events"] >= bad
    )
    assert (bridge.stats["events"], bridge.stats["bad_events"]) == (events, bad)


def wait_for(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met"
        time.sleep(0.002)


def htable_entry(ksr: testing.FakeKSR, ref: ConnRef) -> dict[str, Any] | None:
    assert ref.hairpin
    raw = ksr.htable.sht_get(HTABLE, ref.hairpin)
    return None if raw is None else json.loads(raw)


def put_htable(ksr: testing.FakeKSR, ref: ConnRef, tls: TlsFacts) -> None:
    assert ref.hairpin
    ksr.htable.sht_sets(HTABLE, ref.hairpin, json.dumps(entry(ref, tls)))


# ---------------------------------------------------------------- the stubs themselves


def test_install_puts_fake_in_sys_modules_and_removes_it() -> None:
    import sys

    assert "KSR" not in sys.modules
    with testing.install() as fake:
        import KSR  # type: ignore[import-not-found]

        assert KSR is fake
        KSR.pv.sets("$var(x)", "1")
        assert KSR.pv.get("$var(x)") == "1"
        assert KSR.pv.get("$var(none)") is None
    assert "KSR" not in sys.modules
    fake2 = testing.install()
    try:
        assert sys.modules["KSR"] is fake2
    finally:
        fake2.uninstall()
    assert "KSR" not in sys.modules
    # Whatever was there before comes back.
    sentinel = object()
    sys.modules["KSR"] = sentinel  # type: ignore[assignment]
    try:
        with testing.install() as fake3:
            assert sys.modules["KSR"] is fake3
        assert sys.modules["KSR"] is sentinel
    finally:
        del sys.modules["KSR"]


def test_fake_ksr_api(ksr: testing.FakeKSR) -> None:
    ksr.message(peer=("203.0.113.5", 5070), method="INVITE", headers={"X-Foo": "bar"})
    assert ksr.is_UDP() and not ksr.is_TCP() and ksr.is_method("INVITE")
    assert ksr.pv.get("$conid") is None and ksr.pv.get("$tcp(c_si)") is None
    assert (ksr.pv.get("$Ri"), ksr.pv.get("$Rp")) == ("192.0.2.1", 5060)
    ksr.pv.seti("$var(n)", 5)
    ksr.pv.unset("$var(n)")
    assert ksr.pv.is_null("$var(n)") and ksr.pv.gete("$var(n)") == ""
    assert ksr.htable.sht_get("t", "k") is None
    ksr.htable.sht_seti("t", "k", 3)
    assert ksr.htable.sht_get("t", "k") == 3
    ksr.htable.sht_rm("t", "k")
    ksr.htable.sht_sets("t", "a", "x")
    ksr.htable.sht_reset("t")
    assert ksr.htables == {"t": {}}
    assert ksr.hdr.get("x-foo") == "bar" and ksr.hdr.is_present("X-Foo") == 1
    ksr.hdr.remove("X-Foo")
    assert ksr.hdr.is_present("X-Foo") == -1
    ksr.hdr.append("X-Added: 1\r\n")
    ksr.hdr.append_to_reply("Retry-After: 30\r\n")
    ksr.sl.sl_send_reply(503, "Busy")
    assert ksr.replies == [testing.Reply(503, "Busy", ("Retry-After: 30\r\n",))]
    assert ksr.added_headers == ["X-Added: 1\r\n"] and ksr.removed_headers == ["X-Foo"]
    ksr.info("i")
    ksr.warn("w")
    ksr.err("e")
    ksr.dbg("d")
    assert ksr.logged() == ["i", "w", "e", "d"] and ksr.logged("err") == ["e"]
    with pytest.raises(AttributeError, match=r"KSR\.tm is not modelled"):
        ksr.tm.t_relay()
    # A new message starts clean, the htables stay.
    ksr.htable.sht_sets("t", "a", "x")
    over_hairpin(ksr, conn(1), conid=9)
    assert ksr.is_TCP() and ksr.added_headers == [] and ksr.htable.sht_get("t", "a") == "x"
    assert ksr.pv.get("$tcp(c_si)") == "127.0.0.1" and ksr.pv.get("$tcp(c_sp)") == 41001
    assert (ksr.pv.get("$si"), ksr.pv.get("$sp"), ksr.pv.get("$conid")) == (
        "198.51.100.7", 40001, 9,
    )


# ---------------------------------------------------------------- the current message


def test_udp_message_is_not_from_bridge(ksr: testing.FakeKSR, bridge: TlsBridge,
                                        daemon: FakeDaemon) -> None:
    ksr.message(peer=("203.0.113.5", 5060), local=HAIRPIN)  # UDP, even on the hairpin address
    assert not bridge.from_bridge()
    assert bridge.tls() is None
    assert bridge.connection() is None
    assert bridge.stats["lookups"] == 0 and daemon.requests == []


@pytest.mark.parametrize(
    "local", [("192.0.2.1", 5060), ("127.0.0.1", 5060), ("127.0.0.2", 5062)],
    ids=["public", "other-port", "other-ip"],
)
def test_tcp_on_another_listener_is_not_from_bridge(
    ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon, local: tuple[str, int]
) -> None:
    ksr.message(peer=("203.0.113.5", 33000), proto="tcp", local=local, conid=4)
    assert not bridge.from_bridge()
    assert bridge.tls() is None
    assert bridge.stats["lookups"] == 0 and daemon.requests == []


def test_htable_hit(ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon) -> None:
    ref = conn(1)
    put_htable(ksr, ref, MTLS_FACTS)
    over_hairpin(ksr, ref, conid=11)
    assert bridge.from_bridge()
    found = bridge.connection()
    assert found == BridgeConnection(ref, MTLS_FACTS)
    assert bridge.tls() == MTLS_FACTS  # from the worker cache now
    assert bridge.stats["htable_hits"] == 1 and bridge.stats["cache_hits"] == 1
    assert daemon.requests == []


def test_htable_entry_of_another_peer_falls_back_to_lookup(
    ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon
) -> None:
    old = conn(1)  # a previous connection that used the same hairpin port
    new = conn(2, hairpin_port=41001)
    put_htable(ksr, old, facts(sni="old.example.com"))
    daemon.add(new, facts(sni="new.example.com"))
    over_hairpin(ksr, new, conid=12)
    tls = bridge.tls()
    assert tls is not None and tls.sni == "new.example.com"
    assert bridge.stats["htable_hits"] == 0 and bridge.stats["lookups"] == 1
    assert [(r.op, dict(r.args)) for r in daemon.requests] == [
        ("lookup", {"hairpin": "127.0.0.1:41001"})
    ]


def test_bad_htable_entry_falls_back_to_lookup(
    ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon
) -> None:
    ref = conn(1)
    assert ref.hairpin
    ksr.htable.sht_sets(HTABLE, ref.hairpin, '{"conn": {"id": 1}}')
    daemon.add(ref, facts())
    over_hairpin(ksr, ref, conid=13)
    assert bridge.tls() == facts()
    assert any("bad htable entry" in m for m in ksr.logged("warn"))
    assert daemon.ops() == ["lookup"]


def test_miss_looks_up_and_caches_per_conid(
    ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon
) -> None:
    ref = conn(3)
    daemon.add(ref, MTLS_FACTS)
    over_hairpin(ksr, ref, conid=21)
    assert bridge.connection() == BridgeConnection(ref, MTLS_FACTS)
    assert daemon.ops() == ["lookup"]
    assert dict(daemon.requests[0].args) == {"hairpin": ref.hairpin}
    # The next message on the same Kamailio connection: no request at all.
    over_hairpin(ksr, ref, conid=21)
    assert bridge.tls() == MTLS_FACTS
    assert daemon.ops() == ["lookup"]
    assert bridge.stats["cache_hits"] == 1 and bridge.stats["lookups"] == 1
    # Another Kamailio connection is another cache entry.
    over_hairpin(ksr, ref, conid=22)
    assert bridge.tls() == MTLS_FACTS
    assert daemon.ops() == ["lookup", "lookup"]
    assert ksr.logged("err") == []


def put_map(path: str, ref: ConnRef, tls: TlsFacts) -> None:
    assert ref.hairpin
    port = int(ref.hairpin.rsplit(":", 1)[1])
    data = factsmap.encode_entry(ref, tls.to_dict(local_by_reference=True))
    factsmap.FactsMapWriter(path, 0).put(port, data)


SERVER_FACTS = dataclasses.replace(MTLS_FACTS, local=dataclasses.replace(
    CLIENT_CERT, subject=_dn("sip.example.com"), fingerprint_sha256=":".join(["CD"] * 32)))


@pytest.fixture
def map_path(tmp_path: Path) -> str:
    path = str(tmp_path / "facts.map")
    factsmap.create(path, regions=1, size=128 * 1024)
    return path


@pytest.fixture
def mapped(make_bridge: Callable[..., TlsBridge], map_path: str) -> TlsBridge:
    """A bridge that reads the facts map first (as configured by tlsbridge.toml)."""
    return make_bridge(facts_map=map_path, facts_in_htable=False)


def test_facts_map_hit_after_one_look_up_for_our_certificate(
    ksr: testing.FakeKSR, mapped: TlsBridge, daemon: FakeDaemon, map_path: str,
) -> None:
    bridge, path = mapped, map_path
    first, second = conn(1), conn(2)
    for ref in (first, second):
        put_map(path, ref, SERVER_FACTS)
        daemon.add(ref, SERVER_FACTS)
    # The map names our certificate by fingerprint: this worker asks for it whole once.
    over_hairpin(ksr, first, conid=1)
    looked_up = bridge.connection()
    assert looked_up == BridgeConnection(first, SERVER_FACTS)
    assert daemon.ops() == ["lookup"]
    over_hairpin(ksr, second, conid=2)
    found = bridge.connection()
    assert found == BridgeConnection(second, SERVER_FACTS)
    assert daemon.ops() == ["lookup"] and bridge.stats["map_hits"] == 1
    assert found is not None and looked_up is not None
    assert found.tls.local is looked_up.tls.local  # one object per certificate
    third = conn(3)
    put_map(path, third, SERVER_FACTS)
    over_hairpin(ksr, third, conid=3)
    again = bridge.connection()
    assert again == BridgeConnection(third, SERVER_FACTS) and bridge.stats["map_hits"] == 2
    assert again is not None and again.tls is found.tls  # the same facts are parsed once


def test_a_facts_map_entry_that_is_not_one_is_a_miss(
    ksr: testing.FakeKSR, mapped: TlsBridge, daemon: FakeDaemon, map_path: str,
) -> None:
    ref = conn(1)
    writer = factsmap.FactsMapWriter(map_path, 0)
    daemon.add(ref, MTLS_FACTS)
    for n, junk in enumerate([b"\xc1", msgpack.packb([1, 2]), msgpack.packb([{}, b"\xc1"]),
                              factsmap.encode_entry(ref, {"version": 1}),
                              msgpack.packb([1, "p", "sideways", "h", None, b""])]):
        writer.put(int(str(ref.hairpin).rsplit(":", 1)[1]), junk)
        over_hairpin(ksr, ref, conid=100 + n)
        assert mapped.connection() == BridgeConnection(ref, MTLS_FACTS)  # asked the daemon
    assert mapped.stats["map_hits"] == 0 and daemon.ops() == ["lookup"] * 5


def test_facts_map_entry_of_an_earlier_hairpin_is_not_taken(
    ksr: testing.FakeKSR, mapped: TlsBridge, daemon: FakeDaemon, map_path: str,
) -> None:
    bridge, path = mapped, map_path
    old, new = conn(1, hairpin_port=41500), conn(2, hairpin_port=41500)
    put_map(path, old, MTLS_FACTS)  # the port's entry is of its previous user
    daemon.add(new, MTLS_FACTS)
    over_hairpin(ksr, new, conid=5)
    assert bridge.connection() == BridgeConnection(new, MTLS_FACTS)
    assert daemon.ops() == ["lookup"] and bridge.stats["map_hits"] == 0


def test_lookup_not_found(ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon) -> None:
    over_hairpin(ksr, conn(4), conid=31)
    assert bridge.tls() is None
    assert bridge.stats["lookup_failures"] == 1
    assert any("not_found" in m for m in ksr.logged("err"))
    # Failures are not cached: the next message asks again.
    assert bridge.tls() is None
    assert daemon.ops() == ["lookup", "lookup"]


def test_lookup_answer_for_another_peer_is_refused(
    ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon
) -> None:
    ref = conn(5)
    daemon.add(ref, facts())
    ksr.message(hairpin=HAIRPIN, peer="203.0.113.99:5060", daemon=ref.hairpin, conid=32)
    assert bridge.tls() is None
    assert any("belongs to 198.51.100.7:40005" in m for m in ksr.logged("err"))


def test_daemon_down(ksr: testing.FakeKSR, make_bridge: Callable[..., TlsBridge],
                     tmp_path: Path) -> None:
    bridge = make_bridge(control=ipc(tmp_path, "nobody.sock"))
    over_hairpin(ksr, conn(1), conid=41)
    start = time.monotonic()
    assert bridge.tls() is None
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_MS / 1000 + MARGIN_S
    assert bridge.stats["lookup_failures"] == 1
    [message] = ksr.logged("err")
    assert "no TLS facts for hairpin 127.0.0.1:41001" in message


def test_daemon_not_answering(ksr: testing.FakeKSR, bridge: TlsBridge,
                              daemon: FakeDaemon) -> None:
    daemon.silent = True
    daemon.add(conn(1), facts())
    over_hairpin(ksr, conn(1), conid=42)
    start = time.monotonic()
    assert bridge.tls() is None
    elapsed = time.monotonic() - start
    assert TIMEOUT_MS / 1000 - 0.01 <= elapsed < TIMEOUT_MS / 1000 + MARGIN_S
    assert daemon.ops() == ["lookup"]
    [message] = ksr.logged("err")
    assert "timeout" in message
def test_timeout_is_a_hard_bound_when_daemon_comes_up_late(
    ksr: testing.FakeKSR, make_bridge: Callable[..., TlsBridge], tmp_path: Path
) -> None:
    endpoint = ipc(tmp_path, "late.sock")
    timeout_ms = 300
    bridge = make_bridge(control=endpoint, lookup_timeout_ms=timeout_ms)
    ctx = zmq.Context()
    late = ctx.socket(zmq.ROUTER)  # binds after 60 ms, then never answers
    late.setsockopt(zmq.LINGER, 0)
    timer = threading.Timer(0.06, late.bind, [endpoint])
    timer.start()
    try:
        over_hairpin(ksr, conn(1), conid=43)
        start = time.monotonic()
        assert bridge.tls() is None
        elapsed = time.monotonic() - start
    finally:
        timer.join()
        close_bridge(bridge)
        late.close(linger=0)
        ctx.term()
    # The client reconnects every 100 ms, so it connects before its timeout and then waits
    # a whole timeout again for the reply.
    assert elapsed < timeout_ms / 1000 + 0.05


def test_late_reply_is_ignored(ksr: testing.FakeKSR, bridge: TlsBridge,
                               daemon: FakeDaemon) -> None:
    ref = conn(6)
    daemon.add(ref, facts(sni="right.example.com"))
    # The first request is answered only after it timed out, and then with the wrong facts.
    daemon.hold_next = True
    daemon.stale = entry(ref, facts(sni="stale.example.com"))
    over_hairpin(ksr, ref, conid=51)
    start = time.monotonic()
    assert bridge.tls() is None
    assert time.monotonic() - start < TIMEOUT_MS / 1000 + MARGIN_S
    # The second request gets the late reply first, then its own: only its own counts.
    tls = bridge.tls()
    assert tls is not None and tls.sni == "right.example.com"
    first, second = daemon.requests
    assert first.op == second.op == "lookup" and first.rid != second.rid
    assert bridge.stats["lookups"] == 2 and bridge.stats["lookup_failures"] == 1


def test_child_init_drops_cache_and_sockets(
    ksr: testing.FakeKSR, bridge: TlsBridge, daemon: FakeDaemon
) -> None:
    ref = conn(7)
    daemon.add(ref, facts())
    over_hairpin(ksr, ref, conid=61)
    assert bridge.tls() == facts()
    client = bridge._client
    assert client is not None
    assert bridge.child_init(1) == 0
    client.close()
    assert bridge.tls() == facts()
    assert daemon.ops() == ["lookup", "lookup"]


# ---------------------------------------------------------------- the rtimer process


def test_drain_with_nothing_pending(subscribed: TlsBridge, daemon: FakeDaemon) -> None:
    assert subscribed.drain_events() == 1
    assert subscribed.stats["events"] == 0
    assert daemon.requests == []  # no events, no resync


def test_established_and_closed(ksr: testing.FakeKSR, subscribed: TlsBridge,
                                publisher: Publisher, daemon: FakeDaemon) -> None:
    bridge = subscribed
    one = conn(1)
    publisher.publish(ev.TLS_ESTABLISHED, one, tls=MTLS_FACTS)
    drain_count(bridge, events=1)
    assert htable_entry(ksr, one) == entry(one, MTLS_FACTS)
    assert daemon.ops() == ["list"]  # the first event ever is a resync point
    # The entry is what a worker then finds, without asking the daemon.
    over_hairpin(ksr, one, conid=71)
    assert bridge.tls() == MTLS_FACTS
    assert daemon.ops() == ["list"]

    # A conn.closed for another connection that once had the same hairpin leaves the entry.
    publisher.publish(ev.CONN_CLOSED, conn(99, hairpin_port=41001), reason="peer_closed")
    drain_count(bridge, events=2)
    assert htable_entry(ksr, one) == entry(one, MTLS_FACTS)
    # Its own conn.closed removes it.
    publisher.publish(ev.CONN_CLOSED, one, reason="peer_closed")
    drain_count(bridge, events=3)
    assert htable_entry(ksr, one) is None
    assert daemon.ops() == ["list"]
    assert bridge.stats["events_lost"] == 0 and bridge.stats["resyncs"] == 1


def test_port_reuse_replaces_entry(ksr: testing.FakeKSR, subscribed: TlsBridge,
                                   publisher: Publisher) -> None:
    old, new = conn(1), conn(2, hairpin_port=41001)
    publisher.publish(ev.TLS_ESTABLISHED, old, tls=facts(sni="old"))
    publisher.publish(ev.TLS_ESTABLISHED, new, tls=facts(sni="new"))
    publisher.publish(ev.CONN_CLOSED, old, reason="peer_closed")  # late close of the old one
    drain_count(subscribed, events=3)
    assert htable_entry(ksr, new) == entry(new, facts(sni="new"))


def test_outbound_ready_fills_htable(ksr: testing.FakeKSR, subscribed: TlsBridge,
                                     publisher: Publisher) -> None:
    out = ConnRef(id=8, peer="203.0.113.9:5061", direction="out", hairpin="127.0.0.1:42000")
    publisher.publish(ev.OUTBOUND_READY, out, tls=facts())
    drain_count(subscribed, events=1)
    assert htable_entry(ksr, out) == entry(out, facts())


def test_a_tls_peer_with_a_live_hairpin_is_reached_over_it(ksr: testing.FakeKSR,
                                                           bridge: TlsBridge) -> None:
    uri = parse_uri("sip:198.51.100.7:40001;transport=tls")
    key = target_key(uri.host, 40001, None, "default")
    assert bridge._known_peer(key, uri, plain=True) is None  # Kamailio has no such connection
    assert ksr.modf_calls == [("tcp_get_conid", "198.51.100.7:40001", "$var(tlsb_conid)")]
    ksr.modf_results["tcp_get_conid"] = 1
    assert bridge._known_peer(key, uri, plain=True) == "198.51.100.7:40001"
    # Another SNI or client profile is another identity: it gets a connection of its own.
    assert bridge._known_peer(key, uri, plain=False) is None
    # The daemon's connection for exactly this target comes first.
    ksr.htable.sht_sets(HTABLE, f"o:{key}", "198.51.100.7:40002")
    assert bridge._known_peer(key, uri, plain=True) == "198.51.100.7:40002"


def test_rtimer_takes_only_outbound_events_and_restarts(
    ksr: testing.FakeKSR, make_bridge: Callable[..., TlsBridge], publisher: Publisher
) -> None:
    bridge = make_bridge(facts_in_htable=False)
    bridge.drain_events()
    assert publisher.wait_subscribed() == {"outbound.", "conn.closed.out", "daemon."}
    out = ConnRef(id=8, peer="203.0.113.9:5061", direction="out", hairpin="127.0.0.1:42000")
    key = "203.0.113.9:5061|sni|default"
    publisher.publish(ev.TLS_ESTABLISHED, conn(1), tls=facts())  # inbound: not taken
    publisher.publish(ev.CONN_CLOSED, conn(1), reason="closed")
    publisher.publish(ev.OUTBOUND_READY, out, tls=facts(), key=key, tags=[])
    drain_count(bridge, events=1)
    assert ksr.htable.sht_get(HTABLE, f"o:{key}") == out.peer
    assert htable_entry(ksr, out) is None  # facts stay in the map, not in htable
    publisher.publish(ev.CONN_CLOSED, out, reason="closed", keys=[key])
    drain_count(bridge, events=2)
    assert ksr.htable.sht_get(HTABLE, f"o:{key}") is None


def test_a_restarted_daemon_clears_what_the_old_one_left(
    ksr: testing.FakeKSR, subscribed: TlsBridge, publisher: Publisher, daemon: FakeDaemon
) -> None:
    out = ConnRef(id=8, peer="203.0.113.9:5061", direction="out", hairpin="127.0.0.1:42000")
    publisher.publish(ev.OUTBOUND_READY, out, tls=facts(), key="k", tags=[])
    drain_count(subscribed, events=1)
    assert ksr.htable.sht_get(HTABLE, "o:k") == out.peer
    # It crashed: no conn.closed for its connections, which died with it.
    publisher.restart("daemon-2")
    publisher.publish(ev.DAEMON_STARTED, None, pid=2)
    drain_count(subscribed, events=2)
    assert ksr.htable.sht_get(HTABLE, "o:k") is None
    assert daemon.ops() == ["list", "list"]


def test_events_without_hairpin_leave_htable_alone(
    ksr: testing.FakeKSR, subscribed: TlsBridge, publisher: Publisher
) -> None:
    ref = ConnRef(id=9, peer="203.0.113.9:5061", direction="in")
    publisher.publish(ev.TLS_ESTABLISHED, ref, tls=facts())
    publisher.publish(ev.DAEMON_STARTED, None, pid=1)
    drain_count(subscribed, events=2)
    assert ksr.htables.get(HTABLE, {}) == {}


def test_seq_gap_triggers_resync(ksr: testing.FakeKSR, subscribed: TlsBridge,
                                 publisher: Publisher, daemon: FakeDaemon) -> None:
    bridge = subscribed
    publisher.publish(ev.DAEMON_STARTED, None, pid=1)
    drain_count(bridge, events=1)
    assert daemon.ops() == ["list"]
    publisher.publish(ev.CONN_CLOSED, conn(1), reason="peer_closed")
    drain_count(bridge, events=2)
    assert daemon.ops() == ["list"]
    # Two events are lost (say the SUB queue overflowed); the daemon knows connection 2.
    two = conn(2)
    daemon.add(two, MTLS_FACTS)
    publisher.skip(ev.CONN_CLOSED, conn(5))
    publisher.skip(ev.CONN_CLOSED, conn(6))
    publisher.publish(ev.CONN_CLOSED, conn(3), reason="peer_closed")
    drain_count(bridge, events=3)
    assert daemon.ops() == ["list", "list"]
    assert bridge.stats["events_lost"] == 2 and bridge.stats["resyncs"] == 2
    assert htable_entry(ksr, two) == entry(two, MTLS_FACTS)


def test_new_src_triggers_resync(ksr: testing.FakeKSR, subscribed: TlsBridge,
                                 publisher: Publisher, daemon: FakeDaemon) -> None:
    bridge = subscribed
    publisher.publish(ev.DAEMON_STARTED, None, pid=1)
    drain_count(bridge, events=1)
    publisher.publish(ev.DAEMON_STOPPING, None, pid=1)
    drain_count(bridge, events=2)
    assert daemon.ops() == ["list"]
    # The daemon restarted: a new src whose seq starts at 1 again.
    daemon.add(conn(4), facts())
    publisher.restart("daemon-2")
    publisher.publish(ev.DAEMON_STARTED, None, pid=2)
    drain_count(bridge, events=3)
    assert daemon.ops() == ["list", "list"]
    assert bridge.stats["events_lost"] == 0 and bridge.stats["resyncs"] == 2
    assert htable_entry(ksr, conn(4)) == entry(conn(4), facts())


def test_resync_failure_is_logged(ksr: testing.FakeKSR, subscribed: TlsBridge,
                                  publisher: Publisher, daemon: FakeDaemon) -> None:
    daemon.silent = True
    publisher.publish(ev.TLS_ESTABLISHED, conn(1), tls=facts())
    start = time.monotonic()
    drain_count(subscribed, events=1)
    # resync waits max(lookup timeout, 1 s) for the list.
    assert time.monotonic() - start < 1.0 + MARGIN_S + 0.5
    assert subscribed.stats["resyncs"] == 0
    assert any("resync failed" in m for m in ksr.logged("warn"))
    # The event itself was applied anyway.
    assert htable_entry(ksr, conn(1)) == entry(conn(1), facts())


def test_bad_event_frames_are_counted_and_skipped(
    ksr: testing.FakeKSR, subscribed: TlsBridge, publisher: Publisher
) -> None:
    good = msgpack.packb(
        {"v": ev.EVENTS_VERSION, "src": "x", "seq": 1, "ts": 0.0, "type": "tls.established",
         "conn": None}
    )
    publisher.send_raw([b"tls.established", b"\xc1\xc1"])  # not msgpack
    publisher.send_raw([b"tls.established"])  # one frame
    publisher.send_raw([b"tls.established", good, b"extra"])  # three frames
    publisher.send_raw([b"tls.established", msgpack.packb([1, 2, 3])])  # not a map
    publisher.send_raw([b"tls.established", msgpack.packb({**msgpack.unpackb(good), "v": 99})])
    no_seq = {"v": ev.EVENTS_VERSION, "type": "tls.established"}
    publisher.send_raw([b"tls.established", msgpack.packb(no_seq)])
    one = conn(1)
    publisher.publish(ev.TLS_ESTABLISHED, one, tls=facts())
    drain_count(subscribed, events=1, bad=6)
    assert htable_entry(ksr, one) == entry(one, facts())
    warnings = ksr.logged("warn")
    assert len([m for m in warnings if "dropped a bad event" in m]) == 6
def test_event_with_bad_ts_is_skipped(ksr: testing.FakeKSR, subscribed: TlsBridge,
                                      publisher: Publisher) -> None:
    bad = {"v": ev.EVENTS_VERSION, "src": "x", "seq": 1, "ts": "now", "type": "conn.closed",
           "conn": None}
    publisher.send_raw([b"conn.closed", msgpack.packb(bad)])
    publisher.publish(ev.TLS_ESTABLISHED, conn(1), tls=facts())
    drain_count(subscribed, events=1, bad=1)
    assert htable_entry(ksr, conn(1)) is not None


def test_handlers(ksr: testing.FakeKSR, subscribed: TlsBridge, publisher: Publisher) -> None:
    bridge = subscribed
    seen: list[tuple[str, str, int | None]] = []

    def broken(event: Event) -> None:
        seen.append(("broken", event.type, event.conn.id if event.conn else None))
        raise RuntimeError("handler bug")

    def record(event: Event) -> None:
        seen.append(("record", event.type, event.conn.id if event.conn else None))

    bridge.on(ev.TLS_ESTABLISHED, broken)
    bridge.on(ev.TLS_ESTABLISHED, record)
    bridge.on(ev.TLS_FAILED, record)
    # A handler's type is subscribed to at once (tls.established already was).
    assert publisher.wait_subscribed() == {ev.TLS_FAILED}
    publisher.publish(ev.TLS_ESTABLISHED, conn(1), tls=facts())
    publisher.publish(ev.TLS_FAILED, conn(2), reason="verify_failed")
    publisher.publish(ev.CONN_CLOSED, conn(1), reason="peer_closed")
    publisher.publish(ev.TLS_ESTABLISHED, conn(3), tls=facts())
    drain_count(bridge, events=4)
    assert seen == [
        ("broken", "tls.established", 1),
        ("record", "tls.established", 1),
        ("record", "tls.failed", 2),
        ("broken", "tls.established", 3),
        ("record", "tls.established", 3),
    ]
    errors = ksr.logged("err")
    assert len(errors) == 2 and all("handler bug" in m for m in errors)
    # The htable work was done for every event, handler failures or not.
    assert htable_entry(ksr, conn(1)) is None
    assert htable_entry(ksr, conn(3)) == entry(conn(3), facts())


def test_handler_sees_decoded_event(subscribed: TlsBridge, publisher: Publisher) -> None:
    got: list[Event] = []
    subscribed.on(ev.TLS_ESTABLISHED, got.append)
    sent = publisher.publish(ev.TLS_ESTABLISHED, conn(1), tls=MTLS_FACTS)
    drain_count(subscribed, events=1)
    [event] = got
    assert event == sent
    assert event.tls == MTLS_FACTS


def test_max_drain_bounds_one_run(make_bridge: Callable[..., TlsBridge],
                                  publisher: Publisher) -> None:
    bridge = make_bridge(max_drain=3)
    bridge.drain_events()
    publisher.wait_subscribed()
    for n in range(1, 8):
        publisher.publish(ev.CONN_CLOSED, conn(n), reason="peer_closed")
    time.sleep(0.05)  # let them arrive (not needed for correctness, only for a full first run)
    runs: list[int] = []
    end = time.monotonic() + 5
    while bridge.stats["events"] < 7:
        assert time.monotonic() < end
        before = bridge.stats["events"]
        bridge.drain_events()
        runs.append(bridge.stats["events"] - before)
    assert max(runs) == 3 and sum(runs) == 7, runs


def test_without_facts_in_htable_the_daemon_is_asked_once_per_connection(
    ksr: testing.FakeKSR, make_bridge: Callable[..., TlsBridge], daemon: FakeDaemon
) -> None:
    bridge = make_bridge(facts_in_htable=False)
    ref = conn(7)
    put_htable(ksr, ref, facts(sni="stale.example.com"))  # never read in this mode
    daemon.add(ref, facts())
    over_hairpin(ksr, ref, conid=70)
    assert bridge.tls() == facts()
    assert bridge.tls() == facts()
    assert bridge.stats["htable_hits"] == 0 and daemon.ops() == ["lookup"]


class _Tmx:
    """tmx.t_continue: runs `route` like Kamailio, recording what prepare_relay decided."""

    def __init__(self, bridge: TlsBridge, ksr: testing.FakeKSR) -> None:
        self.bridge, self.ksr = bridge, ksr
        self.calls: list[tuple[int, int, str]] = []
        self.results: dict[int, Any] = {}

    def t_continue(self, index: int, label: int, route: str) -> Any:
        self.calls.append((index, label, route))
        self.ksr.pvs.update({"$T(id_index)": index, "$T(id_label)": label})
        result = self.results.get(index, 1)
        if isinstance(result, Exception):
            raise result
        return result


def _resume_events(publisher: Publisher, tags: list[dict[str, Any]]) -> None:
    out = ConnRef(id=8, peer="203.0.113.9:5061", direction="out", hairpin="127.0.0.1:42000")
    publisher.publish(ev.OUTBOUND_READY, out, tls=facts(), key="k", tags=tags)


def test_a_resumed_route_that_returns_no_int_loses_no_other_transaction(
        ksr: testing.FakeKSR, subscribed: TlsBridge, publisher: Publisher) -> None:
    tmx = ksr.tmx = _Tmx(subscribed, ksr)
    # app_python3 leaves an exception set when the route returns None (as KSR raises it).
    tmx.results[1] = SystemError("<built-in function t_continue> returned a result with an "
                                 "exception set")
    _resume_events(publisher, [{"i": 1, "l": 10, "r": "ksr_route_relay"},
                               {"i": 2, "l": 20, "r": "ksr_route_relay"}])
    drain_count(subscribed, events=1)
    assert tmx.calls == [(1, 10, "ksr_route_relay"), (2, 20, "ksr_route_relay")]
    assert any("ksr_route_relay must return an int" in text for _, text in ksr.logs)


def test_a_transaction_not_suspended_yet_is_continued_at_a_later_tick(
        ksr: testing.FakeKSR, subscribed: TlsBridge, publisher: Publisher) -> None:
    tmx = ksr.tmx = _Tmx(subscribed, ksr)
    tmx.results[3] = -1  # the worker has published its connect but not suspended yet
    _resume_events(publisher, [{"i": 3, "l": 30, "r": "ksr_route_relay"}])
    drain_count(subscribed, events=1)
    assert tmx.calls == [(3, 30, "ksr_route_relay")]
    tmx.results[3] = 1
    subscribed.drain_events()
    assert tmx.calls == [(3, 30, "ksr_route_relay")] * 2
    subscribed.drain_events()
    assert len(tmx.calls) == 2  # continued once: done


def test_native_routing_continues_in_its_own_route(
        ksr: testing.FakeKSR, subscribed: TlsBridge, publisher: Publisher) -> None:
    from tlsbridge.kemi.native import NativeBridge

    native = NativeBridge(subscribed)
    tmx = ksr.tmx = _Tmx(subscribed, ksr)
    _resume_events(publisher, [{"i": 4, "l": 40, "r": "RELAY"}])
    drain_count(subscribed, events=1)  # what tlsb_timer does
    assert tmx.calls == []  # KEMI's t_continue would run no route[] block
    assert native.tlsb_next_resume(None) == 1
    assert (ksr.pvs["$var(tlsb_index)"], ksr.pvs["$var(tlsb_label)"],
            ksr.pvs["$var(tlsb_route)"]) == (4, 40, "RELAY")
    # Inside the continued route, prepare_relay sees the connect's outcome.
    ksr.pvs.update({"$T(id_index)": 4, "$T(id_label)": 40})
    assert subscribed._current_outcome() == Outcome("203.0.113.9:5061")
    ksr.pvs["$var(tlsb_rc)"] = 1
    assert native.tlsb_resumed(None) == 1
    assert subscribed._current_outcome() is None
    assert native.tlsb_next_resume(None) == -1


class _RoutingKSR:
    """The KSR calls a branch route makes, on top of FakeKSR's pseudo-variables."""

    def __init__(self, ksr: testing.FakeKSR) -> None:
        self.ksr = ksr
        ksr.siputils = types.SimpleNamespace(has_totag=lambda: -1)
        ksr.setdsturi = lambda uri: ksr.pvs.__setitem__("$du", uri) or 1
        ksr.set_forward_no_connect = lambda: 1
        ksr.is_method_in = lambda methods: False
        ksr.is_ACK = lambda: False


def test_only_a_tls_branch_advertises_the_public_tls_address(
        ksr: testing.FakeKSR, make_bridge: Callable[..., TlsBridge]) -> None:
    bridge = make_bridge(tls_public={"127.0.0.1:5061": "203.0.113.10:5061"})
    _RoutingKSR(ksr)
    ksr.message(peer="192.0.2.7:5060", method="INVITE")
    ksr.modf_results["tcp_get_conid"] = 1  # the TLS phone has a live hairpin
    # A TLS branch: our Via must name the public TLS address, not the hairpin.
    ksr.pvs["$du"] = "sip:198.51.100.7:40001;transport=tls"
    bridge.prepare_branch()
    assert ksr.pvs["$du"] == "sip:198.51.100.7:40001;transport=tcp;tlsb=ok"
    assert ksr.advertised == ("203.0.113.10", 5061)
    # The next branch, to UDP: Kamailio would keep the address; the bridge drops it.
    ksr.pvs["$du"] = "sip:192.0.2.8:5060"
    bridge.prepare_branch()
    assert ksr.advertised == (None, None)


def test_check_kamailio_refuses_a_cfg_that_breaks_tls_unless_told_to_warn(
        ksr: testing.FakeKSR, make_bridge: Callable[..., TlsBridge]) -> None:
    from tlsbridge.kemi.bridge import KamailioCfgRefused
    from tlsbridge.shared.kamcfg import parse_cfg

    broken = parse_cfg('listen=udp:192.0.2.1:5060\nloadmodule "tls.so"\n'
                       'loadmodule "app_python3.so"\ncfgengine "python"\n')
    bridge = make_bridge(sip_address="192.0.2.1:5060")
    with pytest.raises(KamailioCfgRefused, match=r"tls\.so is loaded"):
        bridge.check_kamailio(broken)
    assert any("tls.so is loaded" in text for level, text in ksr.logs if level == "err")
    bridge.cfg_review = "warn"  # [kamailio] cfg_review = "warn"
    assert ("error", "tls.so is loaded: TLS is the bridge's job; remove it") in \
        bridge.check_kamailio(broken)
