"""Faults on Kamailio's side of the hairpin: Kamailio down, restarted under 500 connections,
closing a hairpin itself, stalled (SIGSTOP) while clients keep sending."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.lab import (
    Bystander,
    daemon_healthy,
    lab_config,
    lab_stack,
    message_request,
    ports_of,
    raise_nofile,
    random_body,
    wait_closed_event,
    wait_until,
)
from tests.support.sip import TlsUA, build_request
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration]

# Why a hairpin ends when Kamailio goes away: its FIN (then the peer's close_notify) or its RST.
KAMAILIO_WENT = {"closed", "kamailio_closed", "kamailio_reset"}


def expect_close_notify(ua: TlsUA, timeout: float = 10.0) -> None:
    """Python's ssl reads a close_notify as the end of the stream: recv() returns b''."""
    ua.sock.settimeout(timeout)
    assert ua.sock.recv(4096) == b"", "data instead of close_notify"


def test_kamailio_down_when_clients_connect(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    with lab_stack(tmp_path, fault_certs, with_kamailio=False) as lab:
        sent = {}
        for _ in range(5):
            ua = lab.ua()
            peer = format_addr(*ua.local)
            request = build_request("OPTIONS", f"sip:127.0.0.1:{lab.tls_port}",
                                    via_proto="TLS", local=ua.local)
            ua.send(request)
            sent[peer] = len(request)
            expect_close_notify(ua, 5)
            ua.close()
        for peer, n in sent.items():
            failed = lab.events.wait_for(
                lambda e, p=peer: e.type == ev.HAIRPIN_FAILED and e.conn.peer == p)
            assert failed.reason == "hairpin_failed"
            assert "refused" in failed.fields["detail"].lower(), failed.fields
            assert str(lab.hairpin_port) in failed.fields["detail"], failed.fields
            closed = wait_closed_event(lab, peer)
            assert closed.reason == "hairpin_failed"
            # What was lost is accounted for (the request may come after the refusal).
            assert closed.fields["bytes_in"] in (0, n), closed.fields
        stats = daemon_healthy(lab)
        assert stats["counters"].get("hairpin.failed.hairpin_failed") == len(sent)
        assert stats["open"] == 0
        # Kamailio comes up: the same daemon serves new connections at once.
        lab.start_kamailio()
        bystander = Bystander(lab)
        bystander.check()
        bystander.close()


def syn_sent_to(port: int) -> int:
    """IPv4 sockets on this host still connecting (SYN_SENT) to local `port`."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines
               if int(line.split()[2].split(":")[1], 16) == port and line.split()[3] == "02")


def test_kamailio_never_answering_the_connect(tmp_path: Path,
                                             fault_certs: dict[str, Path]) -> None:
    """Kamailio's accept queue is full, so the hairpin's SYN is never answered: the connection
    is closed when `connect_timeout` runs out, and one killed while connecting leaves nothing."""
    config = lab_config(tmp_path, fault_certs)
    config.write_text(config.read_text().replace("connect_timeout = 2.0", "connect_timeout = 1.5"))
    hairpin = ("127.0.0.1", ports_of(config)[2])
    stuck = socket.socket()
    stuck.bind(hairpin)
    stuck.listen(0)  # never accepted: once its queue is full, further SYNs are dropped
    fillers = [socket.socket() for _ in range(4)]
    try:
        for f in fillers:
            f.setblocking(False)
            f.connect_ex(hairpin)
        with lab_stack(tmp_path, fault_certs, config=config, with_kamailio=False) as lab:
            before = syn_sent_to(hairpin[1])  # the fillers still trying
            waited, killed = lab.ua(), lab.ua()
            peers = {format_addr(*waited.local): "waited", format_addr(*killed.local): "killed"}

            def connecting() -> dict[str, int]:
                listed = lab.daemon.request("list")["conns"]
                return {peers[c["conn"]["peer"]]: c["conn"]["id"] for c in listed
                        if c["conn"]["peer"] in peers}

            wait_until(lambda: len(connecting()) == 2, 5, "both to be connecting their hairpin")
            assert syn_sent_to(hairpin[1]) == before + 2
            started = time.monotonic()
            lab.daemon.request("kill", id=connecting()["killed"])
            assert wait_closed_event(lab, format_addr(*killed.local)).reason == "killed"
            failed = lab.events.wait_for(lambda e: e.type == ev.HAIRPIN_FAILED
                                         and e.conn.peer == format_addr(*waited.local))
            assert failed.fields["detail"].endswith(": timeout"), failed.fields
            assert 1.0 < time.monotonic() - started < 5.0
            assert wait_closed_event(lab, format_addr(*waited.local)).reason == "hairpin_failed"
            for ua in (waited, killed):
                expect_close_notify(ua, 5)
                ua.close()
            stats = daemon_healthy(lab)
            assert stats["open"] == 0
            assert syn_sent_to(hairpin[1]) == before  # neither hairpin socket was left behind
    finally:
        for f in fillers:
            f.close()
        stuck.close()


def test_hairpin_up_late_gets_the_header_and_the_early_bytes(
        tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    """Kamailio's accept queue is full when the hairpin connects, so the header cannot go
    right after connect() (where the daemon tries it first): it waits for the connect, then the
    PROXY header and what the peer sent meanwhile leave together, and the facts are announced
    once."""
    config = lab_config(tmp_path, fault_certs)
    hairpin = ("127.0.0.1", ports_of(config)[2])
    stuck = socket.socket()
    stuck.bind(hairpin)
    stuck.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    try:
        for f in fillers:
            f.setblocking(False)
            f.connect_ex(hairpin)
        with lab_stack(tmp_path, fault_certs, config=config, with_kamailio=False) as lab:
            before = syn_sent_to(hairpin[1])
            ua = lab.ua()
            peer = format_addr(*ua.local)
            request = build_request("OPTIONS", f"sip:127.0.0.1:{lab.tls_port}",
                                    via_proto="TLS", local=ua.local)
            ua.send(request)
            wait_until(lambda: syn_sent_to(hairpin[1]) == before + 1, 5,
                       "the hairpin to be connecting")
            # Accepting makes room in the queue: a SYN retransmit gets in, the fillers' first.
            filler_addrs = {f.getsockname() for f in fillers}
            stuck.settimeout(10)
            conn = None
            for _ in range(len(fillers) + 1):
                candidate, addr = stuck.accept()
                if addr in filler_addrs:
                    candidate.close()
                else:
                    conn = candidate
                    break
            assert conn is not None, "the hairpin never arrived"
            with conn:
                conn.settimeout(5)
                data = b""
                while len(data) < len(request) or b"\r\n" not in data:
                    more = conn.recv(65536)
                    assert more, "the hairpin closed early"
                    data += more
                header, _, rest = data.partition(b"\r\n")
                assert header.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
                assert rest == request
            established = lab.events_for(
                lambda e: e.type == ev.TLS_ESTABLISHED and e.conn.peer == peer)
            assert len(established) == 1
            ua.close()
    finally:
        for f in fillers:
            f.close()
        stuck.close()


RESTART_CONNS = 500


@pytest.mark.parametrize("workers", [1, 2])
def test_kamailio_restarted_under_500_open_connections(
    tmp_path: Path, fault_certs: dict[str, Path], workers: int
) -> None:
    raise_nofile(RESTART_CONNS * 2 + 1000)
    with lab_stack(tmp_path, fault_certs, workers=workers) as lab:
        uas: list[TlsUA] = []
        try:
            with ThreadPoolExecutor(8) as pool:
                uas = list(pool.map(lambda _: lab.ua(timeout=15), range(RESTART_CONNS)))
                # One transaction each: every hairpin is up and known to Kamailio.
                replies = list(pool.map(lambda ua: lab.options(ua).status, uas))
            assert replies == [200] * RESTART_CONNS
            peers = {format_addr(*ua.local) for ua in uas}
            ids = {e.conn.id for e in lab.events_for(
                lambda e: e.type == ev.TLS_ESTABLISHED and e.conn.peer in peers)}
            assert len(ids) == RESTART_CONNS
            assert daemon_healthy(lab)["open"] == RESTART_CONNS

            old_pid = lab.kamailio.pid
            lab.stop_kamailio()
            for ua in uas:  # each TLS peer is told: close_notify
                expect_close_notify(ua)
                ua.close()
            wait_until(lambda: ids <= {e.conn.id for e in lab.events.of(ev.CONN_CLOSED)}, 20,
                       f"{RESTART_CONNS} conn.closed events")
            closed = [e for e in lab.events.of(ev.CONN_CLOSED) if e.conn.id in ids]
            assert len(closed) == RESTART_CONNS, "one conn.closed per connection, no more"
            assert {e.reason for e in closed} <= KAMAILIO_WENT, {e.reason for e in closed}
            assert daemon_healthy(lab)["open"] == 0
        finally:
            for ua in uas:
                ua.close()
        # A new Kamailio on the same ports: new connections work at once.
        kam = lab.start_kamailio()
        assert kam.pid != old_pid
        bystander = Bystander(lab)
        bystander.check()
        bystander.close()
        daemon_healthy(lab)


def test_kamailio_closes_a_hairpin(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    with lab_stack(tmp_path, fault_certs) as lab:
        bystander = Bystander(lab)
        ua = lab.ua()
        peer = format_addr(*ua.local)
        try:
            request = build_request("OPTIONS", f"sip:close@127.0.0.1:{lab.tls_port}",
                                    via_proto="TLS", local=ua.local)
            ua.send(request)
            reply = ua.read()  # the 200 Kamailio sent before it closed arrives whole
            assert reply.status == 200
            assert lab.x_tls(reply).get("peer") == peer
            expect_close_notify(ua, 5)
        finally:
            ua.close()
        closed = wait_closed_event(lab, peer)
        assert closed.reason in KAMAILIO_WENT, closed.fields
        assert closed.fields["bytes_in"] == len(request)
        assert closed.fields["bytes_out"] > 0
        bystander.check()
        daemon_healthy(lab)
        assert lab.kamailio is not None and lab.kamailio.alive()
        bystander.close()


STALL_CONNS = 8
STALL_MESSAGES = 25


def test_slow_kamailio_back_pressure_both_ways(
    tmp_path: Path, fault_certs: dict[str, Path]
) -> None:
    """Kamailio stops (SIGSTOP) for 2 s while clients keep sending; the clients read nothing
    for a while after it resumes. Every request and reply arrives whole, in order, once."""
    with lab_stack(tmp_path, fault_certs, daemon_extra="max_buffer = 65536") as lab:
        assert lab.kamailio is not None
        uas = [lab.ua(timeout=30) for _ in range(STALL_CONNS)]
        plans = [[(uuid.uuid4().hex, random_body(8 * 1024 + 2000 * i))
                  for i in range(STALL_MESSAGES)] for _ in uas]
        errors: list[str] = []
        received: list[list[tuple[str, str, str]]] = [[] for _ in uas]
        readers_go = threading.Event()

        def sender(k: int) -> None:
            ua = uas[k]
            try:
                for call_id, body in plans[k]:
                    ua.send(message_request(ua.local, f"sip:echo@127.0.0.1:{lab.tls_port}", body,
                                            call_id=call_id))
            except OSError as exc:
                errors.append(f"sender {k}: {exc!r}")

        def reader(k: int) -> None:
            readers_go.wait(30)
            try:
                for _ in plans[k]:
                    r = uas[k].read(30)
                    received[k].append((r.get("Call-ID"), r.get("X-Body-SHA256"),
                                        hashlib.sha256(r.body).hexdigest()))
            except (OSError, TimeoutError) as exc:
                errors.append(f"reader {k}: {exc!r}")

        threads = [threading.Thread(target=f, args=(k,)) for k in range(len(uas))
                   for f in (sender, reader)]
        lab.kamailio.signal_all(signal.SIGSTOP)
        try:
            for t in threads:
                t.start()
            time.sleep(2)
            # While Kamailio is stopped the daemon is not: it answers and handshakes.
            assert lab.daemon.request("ping")["pong"]
            lab.ua().close()
        finally:
            lab.kamailio.signal_all(signal.SIGCONT)
        time.sleep(1)  # replies pile up towards clients that do not read yet
        readers_go.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for k in range(len(uas)):
            want = [(cid, hashlib.sha256(b).hexdigest(), hashlib.sha256(b).hexdigest())
                    for cid, b in plans[k]]
            assert received[k] == want, f"connection {k}: replies lost, altered or reordered"
        for ua in uas:
            ua.close()
        daemon_healthy(lab)
        assert lab.kamailio.alive()
