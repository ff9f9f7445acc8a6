"""The daemon's event socket knows which topics have subscribers, and encodes nothing else."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import trustme
import zmq

from tlsbridge.daemon.channels import EventSink
from tlsbridge.daemon.config import Config, load_config
from tlsbridge.daemon.server import Server
from tlsbridge.shared import events as ev
from tlsbridge.shared.events import ConnRef

IN = ConnRef(id=1, peer="198.51.100.7:40001", direction="in", hairpin="127.0.0.1:41001")
OUT = ConnRef(id=2, peer="203.0.113.9:5061", direction="out", hairpin="127.0.0.1:41002")


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met"
        await asyncio.sleep(0.01)


def test_wants_follows_subscriptions(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/events.sock"

    async def main() -> None:
        sink = EventSink.publisher(endpoint, 1000, lambda: None)
        sub = zmq.Context.instance().socket(zmq.SUB)
        try:
            assert not sink.wants("tls.established.in")  # nobody listens: nothing to encode
            sub.setsockopt(zmq.SUBSCRIBE, b"outbound.")
            sub.setsockopt(zmq.SUBSCRIBE, b"conn.closed.out")
            sub.connect(endpoint)
            await until(lambda: sink.wants("outbound.ready.out"))
            assert sink.wants("outbound.failed") and sink.wants("conn.closed.out")
            assert not sink.wants("conn.closed.in") and not sink.wants("tls.established.in")
            sub.setsockopt(zmq.UNSUBSCRIBE, b"outbound.")
            await until(lambda: not sink.wants("outbound.ready.out"))
            assert sink.wants("conn.closed.out")
            sub.close(linger=0)  # a subscriber that goes away takes its topics with it
            await until(lambda: not sink.wants("conn.closed.out"))
        finally:
            if not sub.closed:
                sub.close(linger=0)
            sink.close()

    asyncio.run(main())


def _config(tmp_path: Path) -> Config:
    cert = trustme.CA().issue_cert("sip.example.com")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    (tmp_path / "t.toml").write_text(f"""
[daemon]
run_dir = "{tmp_path}/run"
[kamailio]
hairpin = "127.0.0.1:5062"
[profile.default]
certificate = "{tmp_path}/server.pem"
private_key = "{tmp_path}/server.pem"
[[listener]]
address = "127.0.0.1:5061"
""")
    return load_config(tmp_path / "t.toml")


def test_the_publisher_sends_only_what_is_subscribed(tmp_path: Path) -> None:
    config = _config(tmp_path)

    async def main() -> list[list[bytes]]:
        server = Server(config)
        server._start_parts({})
        publisher = server.publisher
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"conn.closed.out")
        sub.connect(config.events_endpoint)
        got: list[list[bytes]] = []
        try:
            sink = publisher.sink
            await until(lambda: sink is not None and sink.wants("conn.closed.out"))
            for _ in range(3):
                publisher.publish(ev.ConnClosed(IN, "closed", 0, 0, 0.0))
                publisher.publish(ev.ConnClosed(OUT, "closed", 0, 0, 0.0, keys=[]))
                publisher.publish(ev.TlsEstablished(IN, {}))
            while len(got) < 3:
                await until(lambda: bool(sub.poll(0)))
                got.append(sub.recv_multipart())
            assert not sub.poll(100)
            # Counters count every event, published or not.
            assert server.counters["events.conn.closed"] == 6
        finally:
            sub.close(linger=0)
            await server._close_parts()
        return got

    got = asyncio.run(main())
    events = [ev.decode_event(frames) for frames in got]
    assert [(e.topic, e.seq) for e in events] == [("conn.closed.out", n) for n in (1, 2, 3)]


def test_a_new_subscriber_to_daemon_started_is_greeted(tmp_path: Path) -> None:
    """Kamailio's rtimer takes few events: a daemon restarted under it says so at once."""
    config = _config(tmp_path)

    async def main() -> list[ev.Event]:
        server = Server(config)
        server._start_parts({})
        subs = []
        for prefix in (b"daemon.", b"outbound."):
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
            sub.connect(config.events_endpoint)
            subs.append(sub)
        try:
            await until(lambda: bool(subs[0].poll(0)))
            greeted = [ev.decode_event(subs[0].recv_multipart())]
            await asyncio.sleep(0.2)
            assert not subs[1].poll(0)  # not a subscriber of daemon.started
            return greeted
        finally:
            for sub in subs:
                sub.close(linger=0)
            await server._close_parts()

    [event] = asyncio.run(main())
    assert event.type == ev.DAEMON_STARTED and event.fields["pid"] == os.getpid()
