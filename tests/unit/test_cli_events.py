"""`tlsbridge events` against a publisher of our own: what it prints, and what it calls a loss."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tlsbridge.shared import events as ev
from tlsbridge.shared.events import ConnRef, EventEncoder

CONN = ConnRef(id=7, peer="198.51.100.7:40001", direction="in", hairpin="127.0.0.1:41001")


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[tuple[zmq.Socket, str]]:
    sock = zmq.Context.instance().socket(zmq.XPUB)  # XPUB: we see the subscription arrive
    endpoint = f"ipc://{tmp_path}/events.sock"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close(linger=0)


def follow(publisher: tuple[zmq.Socket, str], sends: list[list[bytes]],
           *flags: str) -> tuple[list[dict], str]:
    sock, endpoint = publisher
    proc = subprocess.Popen([sys.executable, "-m", "tlsbridge.daemon.cli", "events",
                             "--events", endpoint, "--json", "--duration", "2", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while True:  # past an earlier CLI's unsubscription, to this one's subscription
            assert sock.poll(10_000), "the CLI never subscribed"
            if sock.recv()[:1] == b"\x01":
                break
        for frames in sends:
            sock.send_multipart(frames)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()], err


def test_prints_events_and_says_when_some_were_lost(publisher: tuple[zmq.Socket, str]) -> None:
    enc = EventEncoder("src1")
    first = enc.encode(ev.CONN_CLOSED, CONN, reason="closed")[1]
    failed = enc.encode(ev.TLS_FAILED, CONN, reason="handshake_failed", detail="x")[1]
    enc.encode(ev.CONN_CLOSED, CONN, reason="closed")  # never sent: lost on the way
    third = enc.encode(ev.CONN_CLOSED, CONN, reason="peer_closed")[1]
    printed, err = follow(publisher, [first, failed, third])
    assert [(e["type"], e["seq"], e["reason"]) for e in printed] == [
        ("conn.closed", 1, "closed"), ("tls.failed", 1, "handshake_failed"),
        ("conn.closed", 3, "peer_closed")]
    assert "# 1 events lost" in err


def test_with_a_filter_only_losses_among_its_topics_count(
        publisher: tuple[zmq.Socket, str]) -> None:
    enc = EventEncoder("src1")
    closed = enc.encode(ev.CONN_CLOSED, CONN, reason="closed")[1]
    enc.encode(ev.TLS_FAILED, CONN, reason="handshake_failed", detail="x")  # not subscribed
    closed_too = enc.encode(ev.CONN_CLOSED, CONN, reason="peer_closed")[1]
    printed, err = follow(publisher, [closed, closed_too], "--filter", "conn.")
    assert [(e["type"], e["seq"]) for e in printed] == [("conn.closed", 1), ("conn.closed", 2)]
    assert "lost" not in err
    enc.encode(ev.CONN_CLOSED, CONN, reason="closed")  # lost
    last = enc.encode(ev.CONN_CLOSED, CONN, reason="closed")[1]
    printed, err = follow(publisher, [closed, closed_too, last], "--filter", "conn.")
    assert [e["seq"] for e in printed] == [1, 2, 4]
    assert "# 1 events lost" in err


def test_a_bad_event_is_reported_and_skipped(publisher: tuple[zmq.Socket, str]) -> None:
    good = EventEncoder("src1").encode(ev.CONN_CLOSED, CONN, reason="closed")[1]
    printed, err = follow(publisher, [[b"conn.closed", b"\xc1 not msgpack"], good])
    assert [e["type"] for e in printed] == ["conn.closed"]
    assert "# a bad event" in err
