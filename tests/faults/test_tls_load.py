"""Load on the TLS side (openssl engine): thousands of half-open handshakes, a handshake flood, a
peer that never reads. The offenders are closed with events that say why, a bystander's traffic
goes on intact, the daemon keeps running with bounded memory."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.lab import (
    Bystander,
    Lab,
    LabKamailio,
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


def tcp_queues(local: str, peer: str) -> tuple[int, int]:
    """(Recv-Q, Send-Q) of the established TCP socket local -> peer, from `ss`."""
    out = subprocess.run(["ss", "-tnH", "state", "established", "src", local, "dst", peer],
                         capture_output=True, text=True, timeout=10, check=True).stdout.split()
    assert len(out) == 4, f"no single socket {local} -> {peer}: {out}"
    return int(out[0]), int(out[1])


def settled(read: Callable[[], int], what: str, timeout: float = 20.0) -> int:
    """The value `read` returns once it has stopped changing for half a second."""
    end = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            return now
    raise TimeoutError(f"{what} kept changing for {timeout} s")


# Bytes the daemon may hold for one direction of one connection: max_buffer, plus what one
# read from the other side brings before reading pauses (uvloop reads up to 256 KiB), plus TLS
# record overhead on what sits in the kernel. README: "at most about max_buffer per direction".
HELD_BOUND = MAX_BUFFER + 256 * 1024


def test_peer_that_never_reads_keeps_the_daemon_bounded(stalled_lab: Lab) -> None:
    """Kamailio answers one request with 400 replies of 60 KiB (24 MiB) to a peer that reads
    nothing: the daemon holds at most about max_buffer of them, the rest waits in Kamailio.
    What the daemon holds is what it took from Kamailio less what sits in the kernel's
    buffers towards the peer (its send queue, the peer's receive queue)."""
    lab = stalled_lab
    bystander = Bystander(lab)
    for _ in range(5):  # warm the allocator with bodies of the size used below
        echo(bystander.ua, lab, FLOOD_BODY)
    ua = lab.ua()
    peer = format_addr(*ua.local)
    listener = format_addr(*lab.tls_addr)
    before = memory_kib(lab.daemon.pid)
    body = random_body(FLOOD_BODY)
    request = message_request(ua.local, f"sip:flood@127.0.0.1:{lab.tls_port}", body,
                              call_id=uuid.uuid4().hex, extra=[f"X-Flood: {FLOOD_REPLIES}"])
    ua.send(request)

    def taken() -> int:
        conns = {c["conn"]["peer"]: c for c in lab.daemon.request("list")["conns"]}
        assert peer in conns, "the daemon dropped a slow reader it had no reason to drop"
        return conns[peer]["bytes_out"]

    # Kamailio pushes, we read nothing, until the daemon stops taking. Meanwhile the
    # bystander is served.
    echo(bystander.ua, lab, 4096)
    took = settled(taken, "the bytes the daemon takes from Kamailio")
    in_kernel = tcp_queues(listener, peer)[1] + tcp_queues(peer, listener)[0]
    held = took - in_kernel
    after = memory_kib(lab.daemon.pid)
    grown = after["VmRSS"] - before["VmRSS"]
    print(f"took {took} bytes from Kamailio, {in_kernel} in the kernel towards the peer: the "
          f"daemon holds {held}; memory before {before}, after {after}")
    assert took < FLOOD_REPLIES * FLOOD_BODY / 4, "the daemon took most of what Kamailio sent"
    assert held <= HELD_BOUND, (
        f"the daemon holds {held} bytes for a peer that does not read (max_buffer "
        f"{MAX_BUFFER})")
    assert grown < 4 * 1024, f"the daemon grew by {grown} KiB holding a peer that does not read"
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


SINK_MESSAGES = 300


def test_kamailio_that_never_reads_keeps_the_daemon_bounded(stalled_lab: Lab) -> None:
    """The other direction: Kamailio is stopped (SIGSTOP) while a client sends 300 requests of
    60 KiB (18 MiB, more than the kernel buffers on the way). The daemon takes at most about
    max_buffer more than the kernel holds towards Kamailio; when Kamailio runs again every
    byte arrives, in order."""
    lab = stalled_lab
    assert isinstance(lab.kamailio, LabKamailio)
    bystander = Bystander(lab)
    ua = lab.ua(timeout=60)
    peer = format_addr(*ua.local)
    est = lab.events.wait_for(lambda e: e.type == ev.TLS_ESTABLISHED and e.conn.peer == peer)
    hairpin, kamailio_end = est.conn.hairpin, f"127.0.0.1:{lab.hairpin_port}"
    before = memory_kib(lab.daemon.pid)
    bodies = [random_body(FLOOD_BODY) for _ in range(SINK_MESSAGES)]
    call_ids = [uuid.uuid4().hex for _ in bodies]
    data = b"".join(message_request(
        ua.local, f"sip:sink@127.0.0.1:{lab.tls_port}", body, call_id=cid,
        extra=[f"X-Body-SHA256: {hashlib.sha256(body).hexdigest()}"])
        for body, cid in zip(bodies, call_ids, strict=True))
    errors: list[BaseException] = []

    def send() -> None:
        try:
            ua.sock.sendall(data)
        except BaseException as exc:
            errors.append(exc)

    def taken() -> int:
        conns = {c["conn"]["peer"]: c for c in lab.daemon.request("list")["conns"]}
        return conns[peer]["bytes_in"]

    for key in ("sink_ok", "sink_bad"):  # sht_inc counts only an item that exists
        out = lab.kamailio.kamcmd("htable.seti", "tlsb", key, "0")
        assert "error" not in out.lower(), out
    lab.kamailio.signal_all(signal.SIGSTOP)
    sender = threading.Thread(target=send, daemon=True)
    try:
        sender.start()
        took = settled(taken, "the bytes the daemon takes from the client")
        in_kernel = tcp_queues(hairpin, kamailio_end)[1] + tcp_queues(kamailio_end, hairpin)[0]
        held = took - in_kernel
        after = memory_kib(lab.daemon.pid)
        grown = after["VmRSS"] - before["VmRSS"]
        print(f"took {took} bytes from the client, {in_kernel} in the kernel towards Kamailio: "
              f"the daemon holds {held}; memory before {before}, after {after}")
        assert sender.is_alive(), "the client could send everything: nothing pushed back"
        assert took < len(data), "the daemon took everything while Kamailio read nothing"
        assert held <= HELD_BOUND, (
            f"the daemon holds {held} bytes for a Kamailio that does not read (max_buffer "
            f"{MAX_BUFFER})")
        assert grown < 4 * 1024, f"the daemon grew by {grown} KiB while Kamailio slept"
    finally:
        lab.kamailio.signal_all(signal.SIGCONT)
    # Kamailio runs again: it gets every request, each body intact (it counts them, answering
    # none), and then the OPTIONS sent after them.
    sender.join(60)
    assert not sender.is_alive() and not errors, errors
    assert lab.options(ua).status == 200
    counted = {key: re.findall(r"value:\s*(\S+)", lab.kamailio.kamcmd("htable.get", "tlsb", key))
               for key in ("sink_ok", "sink_bad")}
    assert counted == {"sink_ok": [str(SINK_MESSAGES)], "sink_bad": ["0"]}, counted
    ua.close()
    closed = wait_closed_event(lab, peer)
    assert len(data) < closed.fields["bytes_in"] < len(data) + 1024  # and the OPTIONS
    bystander.check()
    daemon_healthy(lab)
    bystander.close()
