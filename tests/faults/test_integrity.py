"""Integrity and churn: bodies up to 64 KiB through the daemon and Kamailio on many concurrent
connections, compared by SHA-256 both ways; a full handshake per transaction for a while."""

from __future__ import annotations

import functools
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.lab import (
    Lab,
    check_echo,
    daemon_healthy,
    lab_stack,
    message_request,
    raise_nofile,
    random_body,
    run_for,
    wait_until,
)
from tests.support.sip import TlsUA
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration]

MAX_BODY = 64 * 1024
# TLS record and read-chunk boundaries first, then random sizes.
EDGE_SIZES = [0, 1, 16383, 16384, 16385, MAX_BODY]
PIPELINE = 3  # requests sent back to back before reading their replies


def _traffic(lab: Lab, ua: TlsUA, messages: int, seed: int) -> tuple[int, int]:
    """Send `messages` MESSAGEs (PIPELINE at a time); returns (bytes sent, bytes received)."""
    rng = random.Random(seed)
    sizes = [EDGE_SIZES[(seed + i) % len(EDGE_SIZES)] if i < 2 else rng.randint(0, MAX_BODY)
             for i in range(messages)]
    sent = got = 0
    ruri = f"sip:echo@127.0.0.1:{lab.tls_port}"
    for start in range(0, messages, PIPELINE):
        batch, wire = [], []
        for i, size in enumerate(sizes[start : start + PIPELINE], start):
            body, call_id = random_body(size, rng), uuid.uuid4().hex
            wire.append(message_request(ua.local, ruri, body, call_id=call_id, cseq=i + 1))
            batch.append((call_id, body))
        data = b"".join(wire)
        ua.send(data)
        sent += len(data)
        for call_id, body in batch:
            reply = ua.read(30)
            assert reply.get("Call-ID") == call_id, "replies out of order or lost"
            check_echo(reply, body)
            got += _wire_length(reply)
    return sent, got


def _wire_length(reply) -> int:  # type: ignore[no-untyped-def]
    head = "\r\n".join([reply.first_line, *(f"{k}: {v}" for k, v in reply.headers)])
    return len(head.encode()) + 4 + len(reply.body)


def _integrity(lab: Lab, conns: int, messages: int, workers: int) -> None:
    raise_nofile(conns * 2 + 1000)
    uas: list[TlsUA] = []
    try:
        with ThreadPoolExecutor(min(workers, conns)) as pool:
            uas = list(pool.map(lambda _: lab.ua(timeout=60), range(conns)))
            assert daemon_healthy(lab)["open"] == conns  # all open at the same time
            started = time.monotonic()
            totals = list(pool.map(lambda k: _traffic(lab, uas[k], messages, k), range(conns)))
            took = time.monotonic() - started
        peers = [format_addr(*ua.local) for ua in uas]
    finally:
        for ua in uas:
            ua.close()
    by_peer = {}
    wait_until(lambda: len(lab.events_for(
        lambda e: e.type == ev.CONN_CLOSED and e.conn.peer in set(peers))) >= conns, 30,
        "conn.closed of every connection")
    for e in lab.events.of(ev.CONN_CLOSED):
        by_peer[e.conn.peer] = e
    for peer, (sent, got) in zip(peers, totals, strict=True):
        closed = by_peer[peer]
        # The daemon relayed exactly what each side sent, no byte more or less.
        assert closed.fields["bytes_in"] == sent, (peer, closed.fields)
        assert closed.fields["bytes_out"] == got, (peer, closed.fields)
        assert closed.reason == "closed", closed.fields
    stats = daemon_healthy(lab)
    assert stats["open"] == 0
    assert lab.kamailio is not None and lab.kamailio.alive()
    mib = sum(s + g for s, g in totals) / 2**20
    print(f"{conns} connections x {messages} messages: {mib:.0f} MiB in {took:.1f} s")


@pytest.mark.parametrize("workers", [1, 2])
def test_integrity_100_connections(tmp_path: Path, fault_certs: dict[str, Path],
                                   workers: int) -> None:
    with lab_stack(tmp_path, fault_certs, workers=workers) as lab:
        _integrity(lab, conns=100, messages=12, workers=50)


@pytest.mark.long
@pytest.mark.timeout(900)
def test_integrity_1000_connections(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    with lab_stack(tmp_path, fault_certs, handshake_timeout=30.0) as lab:
        _integrity(lab, conns=1000, messages=12, workers=100)


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _churn(lab: Lab, seconds: float, threads: int = 4, max_count: int = 1_000_000) -> None:
    assert lab.kamailio is not None
    daemon_pid, kam_pid = lab.daemon.pid, lab.kamailio.pid
    kam_children = _children(kam_pid)
    assert kam_children, "Kamailio's processes not found"
    stop = threading.Event()
    done = [0] * threads
    failures: list[str] = []

    def churner(i: int) -> None:
        while not stop.is_set() and sum(done) < max_count:
            try:
                ua = lab.ua(timeout=10)
                try:
                    reply = lab.options(ua)
                    assert reply.status == 200, reply.first_line
                    assert lab.x_tls(reply).get("peer") == format_addr(*ua.local), reply.headers
                finally:
                    ua.close()
                done[i] += 1
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))
                if len(failures) > 20:
                    return

    run_for(seconds, stop, [functools.partial(churner, i) for i in range(threads)])
    total = sum(done)
    print(f"{total} transactions, each on its own TLS connection, in {seconds:.0f} s")
    assert not failures, f"{len(failures)} unanswered, first: {failures[:3]}"
    assert total >= 10 * seconds
    # Zero crashes: the same daemon and the same Kamailio processes.
    wait_until(lambda: lab.daemon.request("stats")["open"] == 0, 10, "connections to close")
    assert lab.daemon.request("ping")["pid"] == daemon_pid
    assert lab.kamailio.alive() and _children(kam_pid) == kam_children, "a Kamailio process died"
    counters = lab.daemon.request("stats")["counters"]
    assert counters.get("accepted", 0) >= total
    assert not {k: v for k, v in counters.items()
                if k.startswith(("tls.failed.", "hairpin.failed."))}, counters


def test_churn_20s(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    with lab_stack(tmp_path, fault_certs) as lab:
        _churn(lab, 20.0)


@pytest.mark.long
@pytest.mark.timeout(900)
def test_churn_10min(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    with lab_stack(tmp_path, fault_certs) as lab:
        _churn(lab, float(os.environ.get("TLSB_CHURN_SECONDS", 600)))
