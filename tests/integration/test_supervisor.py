"""Several worker processes: a worker that dies takes only its own connections, which are
published closed, and is replaced."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.support.procs import wait_until
from tests.support.sip import TlsUA
from tlsbridge.shared.addr import format_addr, parse_addr
from tlsbridge.shared.factsmap import FactsMapReader, decode_entry, decode_tls, facts_map_of
from tlsbridge.shared.settings import load_settings

pytestmark = [pytest.mark.integration]


def worker_pids(log: Path) -> dict[int, int]:
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+): pid (\d+)", log.read_text())}


def options_ok(ua: TlsUA, stack: Stack) -> bool:
    return ua.request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}").status == 200


def worker_of(conn_id: int) -> int:
    return (conn_id - 1) % 2  # daemon/hub.py: next_id


def test_a_dead_worker_is_replaced(tmp_path: Path, certs: dict[str, Path]) -> None:
    stack = start_stack(tmp_path, certs, engine="openssl-x2")
    uas: list[TlsUA] = []
    ids: list[int] = []
    try:
        # The kernel spreads connections over the workers by a hash of their addresses: go on
        # until both hold some, so that both branches below are taken (bounded).
        while len(uas) < 40 and {worker_of(i) for i in ids} != {0, 1}:
            ua = TlsUA(*stack.tls_addr, ca=stack.ca)
            uas.append(ua)
            assert options_ok(ua, stack)
            by_peer = {c["conn"]["peer"]: c["conn"]["id"]
                       for c in stack.daemon.request("list")["conns"]}
            ids.append(by_peer[format_addr(*ua.local)])
        assert {worker_of(i) for i in ids} == {0, 1}, f"one worker took all of {ids}"
        victim = worker_of(ids[0])
        pids = worker_pids(stack.daemon.log)
        os.kill(pids[victim], signal.SIGKILL)
        died = carried_on = 0
        for ua, conn_id in zip(uas, ids, strict=True):
            if worker_of(conn_id) == victim:
                stack.events.wait_for(lambda e, c=conn_id: e.type == "conn.closed"
                                      and e.conn.id == c and e.reason == "worker_died")
                with pytest.raises((ConnectionError, OSError)):
                    ua.request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}")
                died += 1
            else:  # the other worker's connections carry on
                assert options_ok(ua, stack)
                carried_on += 1
        assert died and carried_on
        wait_until(lambda: len(re.findall(r"worker \d+: pid", stack.daemon.log.read_text())) > 2,
                   10, "the worker to be restarted")
        new_pid = worker_pids(stack.daemon.log)[victim]
        assert new_pid != pids[victim]
        # New connections are served; keep connecting until the new worker (its ids are of a
        # new generation: daemon/hub.py) has served one, once it listens.
        served_by_new: list[int] = []
        end = time.monotonic() + 15
        while not served_by_new and time.monotonic() < end:
            fresh = TlsUA(*stack.tls_addr, ca=stack.ca)
            try:
                peer = format_addr(*fresh.local)
                assert options_ok(fresh, stack)
                est = stack.events.wait_for(lambda e, p=peer: e.type == "tls.established"
                                            and e.conn.peer == p)
                if worker_of(est.conn.id) == victim:
                    assert est.conn.id > 2**32, est.conn.id  # not the dead worker's numbering
                    served_by_new.append(est.conn.id)
            finally:
                fresh.close()
        assert served_by_new, f"worker {victim} (pid {new_pid}) served no new connection"
        assert os.path.exists(f"/proc/{new_pid}")
        assert stack.daemon.request("stats")["counters"]["worker_restarts"] == 1
    finally:
        for ua in uas:
            ua.close()
        stop_stack(stack)


def test_every_worker_writes_the_facts_map(tmp_path: Path, certs: dict[str, Path]) -> None:
    """Kamailio reads each connection's facts from the map, whichever worker holds it."""
    stack = start_stack(tmp_path, certs, engine="openssl-x2")
    uas: list[TlsUA] = []
    try:
        listed: list[dict] = []
        # The kernel spreads connections over the workers by a hash of their addresses: go on
        # until both serve some (bounded; six alone all went to one worker once in ~30 runs).
        while len(uas) < 40 and {(c["conn"]["id"] - 1) % 2 for c in listed} != {0, 1}:
            ua = TlsUA(*stack.tls_addr, ca=stack.ca)
            assert ua.request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}").status == 200
            uas.append(ua)
            listed = stack.daemon.request("list")["conns"]
        assert {(c["conn"]["id"] - 1) % 2 for c in listed} == {0, 1}  # both workers serve
        reader = FactsMapReader(facts_map_of(load_settings(stack.daemon.config).run_dir))
        for item in listed:
            hairpin = item["conn"]["hairpin"]
            raw = reader.get(parse_addr(hairpin)[1])
            assert raw is not None, f"no map entry for {hairpin}"
            conn, tls = decode_entry(raw)
            assert conn.to_dict() == item["conn"]
            assert decode_tls(tls)["cipher"] == item["tls"]["cipher"]
    finally:
        for ua in uas:
            ua.close()
        stop_stack(stack)
