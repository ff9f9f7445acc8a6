"""Load on the TLS side (openssl engine): thousands of half-open handshakes, a handshake flood, a
peer that never reads. The offenders are closed with events that say why, a bystander's traffic
goes on intact, the daemon keeps running with bounded memory."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.lab import (
    Bystander,
    Lab,
    RawTls,
    daemon_healthy,
    echo,
    lab_stack,
    memory_kib,
    message_request,
    open_fds,
    raise_nofile,
    random_body,
    run_for,
    wait_closed_event,
    wait_until,
)
from tests.support.sip import StreamFramer, parse_message
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration]

HALF_OPEN = 2000
HALF_OPEN_TIMEOUT = 3.0


def test_2000_concurrent_half_open_handshakes(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    raise_nofile(HALF_OPEN * 2 + 1000)
    with lab_stack(tmp_path, fault_certs, handshake_timeout=HALF_OPEN_TIMEOUT) as lab:
        bystander = Bystander(lab)
        fds_before = open_fds(lab.daemon.pid)
        hello = RawTls(lab.tls_addr, lab.ca)
        half = hello.client_hello()[:200]
        hello.close()
        socks: list[socket.socket] = []
        try:
            for _ in range(HALF_OPEN):
                s = socket.create_connection(lab.tls_addr, timeout=5)
                s.sendall(half)
                socks.append(s)
            peers = {format_addr(*s.getsockname()[:2]) for s in socks}

            def timed_out() -> list[ev.Event]:
                return lab.events_for(lambda e: e.type == ev.TLS_FAILED and e.conn.peer in peers)

            # While all of them hang: the bystander and new clients are served. Checked always:
            # it must all happen before the first handshake timeout, else this test proves
            # nothing (opening the 2,000 takes ~0.2 s of the 3 s here).
            wait_until(lambda: daemon_healthy(lab)["open"] >= HALF_OPEN + 1, HALF_OPEN_TIMEOUT,
                       "the daemon to hold every half-open connection")
            bystander.check()
            assert daemon_healthy(lab)["open"] >= HALF_OPEN + 1
            assert not timed_out(), (
                f"{len(timed_out())} half-open connections had already timed out when the "
                f"bystander check ended: it did not run while all of them hung")
            # Every one is closed by the handshake timeout, with an event that says so.
            wait_until(lambda: len(timed_out()) >= HALF_OPEN, HALF_OPEN_TIMEOUT + 30,
                       "2000 tls.failed events")
            failed = timed_out()
            assert {e.reason for e in failed} == {"handshake_timeout"}
            assert len({e.conn.peer for e in failed}) == HALF_OPEN
            for s in socks:
                s.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b""
        finally:
            for s in socks:
                s.close()
        bystander.check()
        daemon_healthy(lab)
        wait_until(lambda: lab.daemon.request("stats")["open"] == 1, 10,
                   "only the bystander to be left")
        wait_until(lambda: open_fds(lab.daemon.pid) <= fds_before + 4, 10,
                   "the daemon's file descriptors to come back")
        bystander.close()


def _flood(lab: Lab, seconds: float, threads: int = 4, max_count: int = 200_000) -> None:
    bystander = Bystander(lab)
    stop = threading.Event()
    done = [0] * threads
    errors: list[str] = []
    latencies: list[float] = []

    def flooder(i: int) -> None:
        while not stop.is_set() and sum(done) < max_count:
            try:
                ua = lab.ua(timeout=10)
                ua.close()
                done[i] += 1
            except OSError as exc:
                errors.append(repr(exc))

    def steady() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                echo(bystander.ua, lab, 2048, timeout=5)
            except (OSError, AssertionError) as exc:
                errors.append(f"bystander: {exc!r}")
                return
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)

    run_for(seconds, stop, [*(functools.partial(flooder, i) for i in range(threads)), steady])
    total = sum(done)
    assert not errors, f"{len(errors)} failures, first: {errors[:3]}"
    assert total > 20 * seconds, f"only {total} handshakes in {seconds} s"
    assert latencies and max(latencies) < 3.0, f"bystander latency up to {max(latencies):.2f} s"
    # Every flood connection is closed again, each with its conn.closed.
    wait_until(lambda: lab.daemon.request("stats")["open"] == 1, 30, "flood connections to close")

    def outcomes() -> tuple[set[int], list[ev.Event]]:
        established = {e.conn.id for e in lab.events_for(
            lambda e: e.type == ev.TLS_ESTABLISHED and e.conn.peer != bystander.peer)}
        return established, lab.events_for(lambda e: e.type == ev.TLS_FAILED)

    # Each flood connection has its tls.established, or a tls.failed: a client done with its
    # side of a TLS 1.3 handshake may reset before the daemon has read its Finished. (The
    # daemon's events leave in batches of 2 ms: the last may still be on their way.)
    wait_until(lambda: sum(map(len, outcomes())) >= total, 10, "an event for every connection")
    established, failed = outcomes()
    assert all(e.reason == "eof_in_handshake" for e in failed), failed
    wait_until(lambda: established <= {e.conn.id for e in lab.events.of(ev.CONN_CLOSED)}, 10,
               "a conn.closed for every flood connection")
    bystander.check()
    daemon_healthy(lab)
    assert lab.kamailio is not None and lab.kamailio.alive()
    print(f"{total} handshakes in {seconds} s ({len(failed)} reset before the daemon's end), "
          f"bystander max latency {max(latencies):.3f} s")
    bystander.close()


def test_handshake_flood_5s(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    with lab_stack(tmp_path, fault_certs) as lab:
        _flood(lab, 5.0)


@pytest.mark.long
@pytest.mark.timeout(300)
def test_handshake_flood_30s(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    with lab_stack(tmp_path, fault_certs) as lab:
        _flood(lab, 30.0)


MAX_BUFFER = 64 * 1024
FLOOD_REPLIES = 400
FLOOD_BODY = 60 * 1024


@pytest.fixture
def stalled_lab(tmp_path: Path, fault_certs: dict[str, Path]) -> Iterator[Lab]:
    with lab_stack(tmp_path, fault_certs, daemon_extra=f"max_buffer = {MAX_BUFFER}") as lab:
        yield lab


def test_peer_that_never_reads_keeps_the_daemon_bounded(stalled_lab: Lab) -> None:
    """Kamailio answers one request with 400 replies of 60 KiB (24 MiB) to a peer that reads
    nothing: the daemon holds at most about max_buffer per direction, not the 24 MiB."""
    lab = stalled_lab
    bystander = Bystander(lab)
    for _ in range(5):  # warm the allocator with bodies of the size used below
        echo(bystander.ua, lab, FLOOD_BODY)
    ua = lab.ua()
    peer = format_addr(*ua.local)
    time.sleep(0.3)
    before = memory_kib(lab.daemon.pid)
    body = random_body(FLOOD_BODY)
    request = message_request(ua.local, f"sip:flood@127.0.0.1:{lab.tls_port}", body,
                              call_id=uuid.uuid4().hex, extra=[f"X-Flood: {FLOOD_REPLIES}"])
    ua.send(request)
    # Kamailio pushes; we read nothing for a while. Meanwhile the bystander is served.
    end = time.monotonic() + 4
    while time.monotonic() < end:
        echo(bystander.ua, lab, 4096)
        time.sleep(0.2)
    after = memory_kib(lab.daemon.pid)
    grown = after["VmRSS"] - before["VmRSS"]
    peak = after["VmHWM"] - before["VmRSS"]
    print(f"daemon memory before {before}, after {after}")
    conns = {c["conn"]["peer"]: c for c in lab.daemon.request("list")["conns"]}
    assert peer in conns, "the daemon dropped a slow reader it had no reason to drop"
    held = conns[peer]["bytes_out"]
    assert grown < 12 * 1024 and peak < 16 * 1024, (
        f"the daemon grew by {grown} KiB (peak +{peak} KiB) holding a peer that does not read; "
        f"it took {held} bytes from Kamailio for it")
    bystander.check()
    # Now the peer reads: every reply it gets is whole and intact, and it gets all the daemon
    # took from Kamailio.
    framer, got, replies, first = StreamFramer(), 0, 0, b""
    want = hashlib.sha256(body).hexdigest()
    ua.sock.settimeout(3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            data = ua.sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        got += len(data)
        for msg in framer.feed(data):
            first = first or msg
            assert msg == first, "replies differ: one was altered on the way"
            reply = parse_message(msg)
            assert reply.status == 200 and hashlib.sha256(reply.body).hexdigest() == want
            replies += 1
    ua.close()
    closed = wait_closed_event(lab, peer)
    assert closed.reason, closed.fields
    assert got == closed.fields["bytes_out"], "bytes taken from Kamailio were not delivered"
    # Kamailio itself gives up on a connection whose write queue is full (tcp_conn_wq_max) and
    # may leave a reply half-written: that is the most the stream may end with.
    assert first.startswith(framer.buf.lstrip(b"\r\n")), "the stream ends in bytes no reply has"
    assert closed.fields["bytes_in"] == len(request)
    print(f"the slow peer got {replies} replies, {got} bytes")
    bystander.check()
    daemon_healthy(lab)
    bystander.close()
