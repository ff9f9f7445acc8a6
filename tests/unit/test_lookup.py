"""The fast facts look-up: codec, and a client against the real server in a loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from tlsbridge.daemon.lookup_server import LookupServer
from tlsbridge.shared import lookup as lk


def test_codec_round_trip() -> None:
    assert lk.decode_request(lk.encode_request(7, "127.0.0.1:4000")) == (7, "127.0.0.1:4000")
    assert lk.decode_reply(lk.encode_reply(7, b'{"a":1}')) == (7, b'{"a":1}')
    assert lk.decode_reply(lk.encode_reply(2**32 + 3, None)) == (3, None)


@pytest.mark.parametrize("data", [b"", b"Q", b"X0000key", b"A0000", b"A00002", b"Q" + b"x" * 400])
def test_codec_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        lk.decode_request(data)
    with pytest.raises(ValueError):
        lk.decode_reply(data)


SLOW = 0.3  # seconds the server takes for "slow:" keys: well past a 10 ms client, even under load


@pytest.fixture
def server(tmp_path: Path):
    path = str(tmp_path / "lookup.sock")
    entries = {"127.0.0.1:1": b'{"conn":{"id":1},"tls":{}}'}
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def slow(key: str) -> bytes | None:
        await asyncio.sleep(SLOW)
        return entries.get(key.removeprefix("slow:"))

    def find(key: str):
        return slow(key) if key.startswith("slow:") else entries.get(key)

    srv = LookupServer(path, find)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(lambda: (srv.start(), started.set()))
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(5)
    yield path
    loop.call_soon_threadsafe(srv.close)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def test_client_finds_and_misses(server: str) -> None:
    client = lk.LookupClient(server, timeout_ms=2000)
    assert client.lookup("127.0.0.1:1") == {"conn": {"id": 1}, "tls": {}}
    assert client.lookup("127.0.0.1:2") is None
    assert client.lookup("slow:127.0.0.1:1") == json.loads(b'{"conn":{"id":1},"tls":{}}')
    client.close()


def test_no_daemon_fails_at_once(tmp_path: Path) -> None:
    client = lk.LookupClient(str(tmp_path / "nobody.sock"), timeout_ms=2000)
    start = time.monotonic()
    with pytest.raises(lk.LookupUnavailable):
        client.lookup("127.0.0.1:1")
    assert time.monotonic() - start < 0.5


def test_a_late_answer_is_not_taken_for_the_next(server: str) -> None:
    client = lk.LookupClient(server, timeout_ms=10)
    with pytest.raises(lk.LookupUnavailable):
        client.lookup("slow:127.0.0.1:1")  # answered after the timeout
    client.timeout_ms = 500
    time.sleep(SLOW + 0.1)  # the late answer has arrived
    assert client.lookup("127.0.0.1:2") is None  # not the stale answer of the slow one
