"""ZeroMQ: no subscriber, a subscriber that stops reading, garbage on the control socket, ops on
unknown or ill-typed connection ids. The daemon answers errors, never crashes, keeps relaying."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.faults.lab import (
    Bystander,
    Lab,
    daemon_healthy,
    lab_stack,
    memory_kib,
    wait_until,
)
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.control import ControlError

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, fault_certs: dict[str, Path]) -> Iterator[Lab]:
    with lab_stack(tmp_path_factory.mktemp("control"), fault_certs) as lab:
        yield lab


def raw_request(endpoint: str, frames: list[bytes], kind: int = zmq.REQ,
                timeout: float = 2.0) -> list[bytes] | None:
    """Send raw frames on a fresh socket; the reply frames, or None if none came."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        if sock.poll(int(timeout * 1000)):
            return sock.recv_multipart()
        return None
    finally:
        sock.close(linger=0)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def error_of(reply: list[bytes] | None) -> dict[str, Any]:
    assert reply is not None, "no reply at all"
    body = msgpack.unpackb(reply[-1], raw=False)
    assert body.get("ok") is False, body
    return body


# -- events -----------------------------------------------------------------------------------


def test_no_subscriber_at_all(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    """Nobody subscribes (no tap, Kamailio's rtimer does not drain): Kamailio still gets the
    facts by control look-up, and the daemon publishes into the void without harm."""
    with lab_stack(tmp_path, fault_certs, tap=False,
                   kamailio_env={"TLSB_FAULTS_NO_EVENTS": "1"}) as lab:
        bystander = Bystander(lab)
        for _ in range(30):
            ua = lab.ua()
            try:
                reply = lab.options(ua)
                assert reply.status == 200
                assert lab.x_tls(reply).get("peer") == format_addr(*ua.local), reply.headers
            finally:
                ua.close()
        bystander.check()
        stats = daemon_healthy(lab)
        assert stats["counters"].get("events.tls.established", 0) >= 31
        bystander.close()


def seqs_by_topic(events: list[ev.Event]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in events:
        out.setdefault(e.topic, []).append(e.seq)
    return out


def test_subscriber_that_stops_reading(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    extra = "\n[zmq]\nevents_hwm = 2000\n"
    with lab_stack(tmp_path, fault_certs, extra=extra) as lab:
        bystander = Bystander(lab)
        stuck = zmq.Context.instance().socket(zmq.SUB)
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.RCVBUF, 4096)
        stuck.setsockopt(zmq.LINGER, 0)
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        stuck.connect(lab.daemon.settings.events_endpoint)
        try:
            # Subscribed once greeted (then it reads nothing more).
            assert stuck.poll(5000), "the stuck subscriber was never greeted"
            assert ev.decode_event(stuck.recv_multipart()).type == ev.DAEMON_STARTED
            # Many cheap events: TCP connections that close before any handshake
            # (tls.failed + conn.closed each), while the stuck subscriber reads nothing.
            started, made = time.monotonic(), 0
            while made < 3000 and time.monotonic() - started < 30:
                with socket.create_connection(lab.tls_addr):
                    pass
                made += 1
                if made % 500 == 0:
                    bystander.check(fresh=False)
            wait_until(lambda: lab.daemon.request("stats")["counters"].get(
                "conn.closed.eof_in_handshake", 0) >= made, 20, "all closes to be handled")
            # The daemon is unaffected: it answers, relays, accepts.
            bystander.check()
            daemon_healthy(lab)
            # A healthy subscriber lost nothing: one stuck subscriber costs only itself.
            closed = [e for e in lab.events.of(ev.CONN_CLOSED)
                      if e.reason == "eof_in_handshake"]
            assert len(closed) >= made
            for topic, seqs in seqs_by_topic(lab.events.events).items():
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"a gap in {topic}"
            # Whatever the stuck one still gets is in order: a loss shows as a gap in seq.
            got = []
            while stuck.poll(200):
                got.append(ev.decode_event(stuck.recv_multipart()))
            for seqs in seqs_by_topic(got).values():
                assert all(a < b for a, b in itertools.pairwise(seqs))
        finally:
            stuck.close(linger=0)
        bystander.close()


# -- control ----------------------------------------------------------------------------------

GARBAGE = {
    "empty": b"",
    "not_msgpack": b"\xc1\xc1\xc1 this is not msgpack",
    "truncated": pack({"op": "ping", "rid": 3, "pad": "x" * 100})[:20],
    "a_list": pack(["ping", 1]),
    "a_string": pack("ping"),
    "no_op": pack({"rid": 7}),
    "op_not_a_string": pack({"op": 12, "rid": 8}),
    "op_as_bytes": pack({"op": b"ping", "rid": 9}),
    "unknown_op": pack({"op": "format_disk", "rid": 10}),
    "rid_not_int": pack({"op": "ping", "rid": "eleven"}),
    "future_version": pack({"op": "ping", "rid": 12, "v": 99}),
    "lookup_without_key": pack({"op": "lookup", "rid": 13}),
    "lookup_two_keys": pack({"op": "lookup", "rid": 14, "id": 1, "peer": "1.2.3.4:5"}),
    "lookup_hairpin_list": pack({"op": "lookup", "rid": 15, "hairpin": ["127.0.0.1:1"]}),
    "kill_without_id": pack({"op": "kill", "rid": 16}),
    "kill_id_string": pack({"op": "kill", "rid": 17, "id": "1"}),
    "connect_no_host": pack({"op": "connect", "rid": 18}),
    "connect_bad_port": pack({"op": "connect", "rid": 19, "host": "127.0.0.1", "port": 70000}),
    "deep_nesting": b"\x91" * 60_000 + b"\xc0",
    "huge_array_header": b"\xdd\xff\xff\xff\xff",
    "oversized_100k": pack({"op": "ping", "rid": 20, "pad": "x" * 100_000}),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_on_the_control_socket_gets_an_error_reply(lab: Lab, name: str) -> None:
    endpoint = lab.daemon.settings.control_endpoint
    body = error_of(raw_request(endpoint, [GARBAGE[name]]))
    assert body["error"]["code"] in ("bad_request", "unknown_op", "unsupported"), body
    assert body["error"]["message"], body
    if name == "oversized_100k":
        assert "exceeds" in body["error"]["message"], body
    daemon_healthy(lab)


@pytest.mark.parametrize(("frames", "want"), [
    # No empty delimiter: the frame is the body, and garbage.
    ([b"only-one-frame-no-delimiter"], "bad_request"),
    # A longer envelope is kept and sent back around the answer.
    ([b"", b"", b"", pack({"op": "ping", "rid": 1})], "pong"),
    ([b"", b"\x00" * 10], "bad_request"),
], ids=["no_delimiter", "long_envelope", "zeros"])
def test_odd_framing_from_a_dealer(lab: Lab, frames: list[bytes], want: str) -> None:
    reply = raw_request(lab.daemon.settings.control_endpoint, frames, kind=zmq.DEALER, timeout=2)
    assert reply is not None, "no reply at all"
    assert reply[:-1] == frames[:-1], f"the envelope came back as {reply[:-1]!r}"
    body = msgpack.unpackb(reply[-1], raw=False)
    if want == "pong":
        assert body.get("ok") is True and body.get("pong"), body
    else:
        assert body.get("ok") is False and body["error"]["code"] == want, body
    daemon_healthy(lab)


def wait_monitor(monitor: zmq.Socket, kind: int, seen: list[int], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while kind not in seen:
        left = int((end - time.monotonic()) * 1000)
        assert left > 0 and monitor.poll(left), f"no event {kind} from the monitor; saw {seen}"
        seen.append(recv_monitor_message(monitor)["event"])


def test_oversized_beyond_the_transport_limit(lab: Lab) -> None:
    """8 MiB on the control socket (ZeroMQ's limit there is 1 MiB): the sender is disconnected,
    answered nothing, and the daemon keeps no memory of it."""
    before = memory_kib(lab.daemon.pid)["VmRSS"]
    endpoint = lab.daemon.settings.control_endpoint
    for _ in range(2):
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(endpoint)
            seen: list[int] = []
            wait_monitor(monitor, zmq.EVENT_CONNECTED, seen)
            sock.send_multipart([pack({"op": "ping", "rid": 1, "pad": b"\0" * (8 << 20)})])
            wait_monitor(monitor, zmq.EVENT_DISCONNECTED, seen)  # the daemon hung up on us
            assert not sock.poll(200), "the daemon answered an 8 MiB request"
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
    daemon_healthy(lab)
    grown = memory_kib(lab.daemon.pid)["VmRSS"] - before
    assert grown < 16 * 1024, f"daemon kept {grown} KiB after 16 MiB of refused requests"
    bystander = Bystander(lab)
    bystander.check()
    bystander.close()


def test_ops_on_unknown_connections_answer_not_found(lab: Lab) -> None:
    bystander = Bystander(lab)
    try:
        for op, args in [("lookup", {"id": 987654}), ("lookup", {"hairpin": "127.0.0.1:1"}),
                         ("lookup", {"peer": "192.0.2.1:5061"}), ("kill", {"id": 987654})]:
            with pytest.raises(ControlError) as refused:
                lab.daemon.request(op, **args)
            assert refused.value.code == "not_found", (op, args, refused.value)
        # A connection that was there and is gone: not_found too, no second conn.closed.
        ua = lab.ua()
        peer = format_addr(*ua.local)
        assert lab.options(ua).status == 200
        est = lab.events.wait_for(lambda e: e.type == ev.TLS_ESTABLISHED and e.conn.peer == peer)
        ua.close()
        lab.events.wait_for(lambda e: e.type == ev.CONN_CLOSED and e.conn.id == est.conn.id)
        for op in ("lookup", "kill"):
            with pytest.raises(ControlError) as refused:
                lab.daemon.request(op, id=est.conn.id)
            assert refused.value.code == "not_found"
        # A second conn.closed would have been published before the events of a connection
        # made after the kill (one publisher, one socket: in order).
        later = lab.ua()
        later_peer = format_addr(*later.local)
        later.close()
        lab.events.wait_for(lambda e: e.type == ev.CONN_CLOSED and e.conn.peer == later_peer)
        assert len([e for e in lab.events.of(ev.CONN_CLOSED) if e.conn.id == est.conn.id]) == 1
        bystander.check()
    finally:
        bystander.close()
    daemon_healthy(lab)


def test_connection_ids_of_the_wrong_type_are_bad_requests(
    tmp_path: Path, fault_certs: dict[str, Path]
) -> None:
    """msgpack `true` is not connection 1: a bool id must not look up or kill anything."""
    with lab_stack(tmp_path, fault_certs) as lab:
        bystander = Bystander(lab)  # the first connection: id 1
        est = lab.events.wait_for(
            lambda e: e.type == ev.TLS_ESTABLISHED and e.conn.peer == bystander.peer)
        assert est.conn.id == 1
        endpoint = lab.daemon.settings.control_endpoint
        for op in ("kill", "lookup"):
            for bad in (True, 1.0, "1", [1], None):
                reply = raw_request(endpoint, [pack({"op": op, "rid": 5, "id": bad})])
                body = msgpack.unpackb(reply[-1], raw=False) if reply else {}
                assert body.get("ok") is False, (
                    f"{op} with id={bad!r} was accepted: ok={body.get('ok')}, "
                    f"conn={body.get('conn', {}).get('id')}, killed={body.get('killed')}")
                assert body["error"]["code"] == "bad_request", (op, bad, body)
        bystander.check()  # still alive: nothing was killed
        daemon_healthy(lab)
        bystander.close()


def test_every_new_subscriber_is_greeted_with_daemon_started(lab: Lab) -> None:
    """README (events): daemon.started also goes to each new subscriber of it, so that one
    that outlived a daemon learns of the restart at once; the second subscriber of a prefix
    as much as the first."""
    ctx = zmq.Context.instance()
    subs: list[zmq.Socket] = []
    try:
        for i in range(3):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"daemon.started")
            sub.connect(lab.daemon.settings.events_endpoint)
            subs.append(sub)
            assert sub.poll(5000), f"subscriber {i + 1} was not greeted"
            greeting = ev.decode_event(sub.recv_multipart())
            assert greeting.type == ev.DAEMON_STARTED
            assert greeting.fields["pid"] == lab.daemon.pid
    finally:
        for sub in subs:
            sub.close(linger=0)
