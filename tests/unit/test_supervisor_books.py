"""The supervisor keeps its books (table, admission, counters) from the notes beside its
workers' events, and decodes an event only for a subscriber or a question about it."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import msgpack
import pytest

from tests.unit.test_event_sink import _config
from tlsbridge.daemon.note import decode_note, encode_note
from tlsbridge.daemon.publisher import FactsPublisher
from tlsbridge.daemon.supervisors.broker import Broker
from tlsbridge.shared import events as ev
from tlsbridge.shared.events import ConnRef
from tlsbridge.shared.facts import TlsFacts

IN = ConnRef(id=3, peer="198.51.100.7:40001", direction="in", hairpin="127.0.0.1:41001",
             listener="127.0.0.1:5061")
OUT = ConnRef(id=5, peer="203.0.113.9:5061", direction="out", hairpin="127.0.0.1:41002")
FACTS = TlsFacts(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", cipher_bits=128,
                 sni="sip.example.com", alpn=None, resumed=False, peer_cert_present=False,
                 peer_verified=False, verify_error="no peer certificate", peer=None,
                 local=None, engine="openssl")


class Recorder:
    """An event sink that takes the topics it is told to, and keeps what it is sent."""

    def __init__(self, wanted: tuple[str, ...] | None = None) -> None:
        self.wanted = wanted
        self.sent: list[list[bytes]] = []

    def wants(self, topic: str) -> bool:
        return self.wanted is None or topic.startswith(self.wanted)

    def send(self, frames: list[bytes]) -> None:
        self.sent.append(list(frames))


Worker = tuple[FactsPublisher, Recorder]


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    sink = Recorder()
    publisher = FactsPublisher("w0", collections.Counter(), sink=sink,  # type: ignore[arg-type]
                               noted=True)
    return publisher, sink


@pytest.fixture
def sup(tmp_path: Path) -> Broker:
    supervisor = Broker(_config(tmp_path), 2)
    supervisor.admits = True
    supervisor._events = Recorder(("conn.closed.out", "tls.failed"))  # type: ignore[assignment]
    return supervisor


def test_a_worker_notes_each_event_about_a_connection(worker: Worker) -> None:
    publisher, sink = worker
    publisher.publish(ev.ConnClosed(IN, "peer_closed", 10, 20, 1.0))
    publisher.publish(ev.CertExpiring("profile.default", "/c.pem", "2030-01-01", 3.0))
    closed, expiring = sink.sent
    assert decode_note(closed[2]) == (3, "127.0.0.1:41001", "peer_closed", 10, 20)
    assert len(expiring) == 2  # about no connection: nothing to note


@pytest.mark.parametrize("junk", [b"\xc1", msgpack.packb([1, 2]),
                                  msgpack.packb(["1", None, None, 0, 0])])
def test_a_note_that_is_not_one_is_refused(junk: bytes) -> None:
    with pytest.raises(ValueError, match="not a worker's note"):
        decode_note(junk)
    assert decode_note(encode_note(OUT, {})) == (5, "127.0.0.1:41002", None, 0, 0)


def test_books_kept_from_the_notes(worker: Worker, sup: Broker) -> None:
    publisher, sink = worker
    assert sup._admit("198.51.100.7", IN.id) is None
    publisher.publish(ev.TlsEstablished(IN, FACTS))
    publisher.publish(ev.TlsEstablished(OUT, FACTS))
    publisher.publish(ev.OutboundReady(OUT, FACTS, "203.0.113.9:5061", {}, "trunk-a", []))
    for frames in sink.sent:
        sup._republish(frames)
    assert sup.by_hairpin == {"127.0.0.1:41001": 3, "127.0.0.1:41002": 5}
    snapshot = sup.metrics_snapshot()
    assert (snapshot["open_in"], snapshot["open_out"]) == (1, 1)
    assert sup.table[5].keys == ["trunk-a"]
    # A look-up the facts map missed decodes the kept event.
    entry = json.loads(sup.lookup_entry("127.0.0.1:41001"))
    assert entry == {"conn": IN.to_dict(), "tls": FACTS.to_dict()}
    assert sup._lookup_local({"id": 5})["keys"] == ["trunk-a"]  # type: ignore[index]
    assert sup.admission.active == 1

    sink.sent.clear()
    publisher.publish(ev.ConnClosed(IN, "peer_closed", 10, 20, 1.0))
    publisher.publish(ev.ConnClosed(OUT, "closed", 1, 2, 1.0, keys=[]))
    publisher.publish(ev.TlsFailed(ConnRef(id=7, peer="192.0.2.1:1", direction="in"),
                             "handshake_failed", "no shared cipher"))
    for frames in sink.sent:
        sup._republish(frames)
    assert sup.table == {} and sup.by_hairpin == {}
    assert sup.admission.active == 0  # the close gave the admission back
    assert sup.counters["conn.closed.peer_closed"] == 1
    assert sup.counters["tls.failed.handshake_failed"] == 1
    assert sup.counters["events.tls.established"] == 2
    assert (sup.counters["bytes_in_closed"], sup.counters["bytes_out_closed"]) == (11, 22)
    # Only what was subscribed is republished: as the supervisor's, numbered per topic.
    published = [ev.decode_event(frames) for frames in sup._events.sent]  # type: ignore[attr-defined]
    assert [(e.topic, e.seq, e.src) for e in published] == [
        ("conn.closed.out", 1, sup.src), ("tls.failed.in", 1, sup.src)]
    assert published[0].conn == OUT and published[0].fields["reason"] == "closed"


def test_a_worker_event_that_is_not_one_loses_nothing_else(
    worker: Worker, sup: Broker, caplog: pytest.LogCaptureFixture,
) -> None:
    publisher, sink = worker
    publisher.publish(ev.TlsEstablished(IN, FACTS))
    good = sink.sent[0]
    sup._republish([good[0], good[1], b"\xc1"])
    sup._republish([b"conn.closed.out", b"\xc1", encode_note(OUT, {"reason": "closed"})])
    sup._republish(good)
    assert list(sup.table) == [3]
    assert sum("bad event from a worker" in r.message for r in caplog.records) == 2
    sup.table[3].body = b"\xc1"  # were it ever stored broken, a question gets a clear miss
    assert sup._lookup_local({"id": 3}) is None
