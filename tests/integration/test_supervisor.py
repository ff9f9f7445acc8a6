"""Several worker processes: a worker that dies takes only its own connections, which are
published closed, and is replaced."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import start_stack, stop_stack
from tests.support.procs import wait_until
from tests.support.sip import TlsUA
from tlsbridge.shared.addr import format_addr, parse_addr
from tlsbridge.shared.factsmap import FactsMapReader, decode_entry, decode_tls, facts_map_of
from tlsbridge.shared.settings import load_settings

pytestmark = [pytest.mark.integration]


def worker_pids(log: Path) -> dict[int, int]:
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+): pid (\d+)", log.read_text())}


def test_a_dead_worker_is_replaced(tmp_path: Path, certs: dict[str, Path]) -> None:
    stack = start_stack(tmp_path, certs, engine="openssl-x2")
    uas: list[TlsUA] = []
    try:
        for _ in range(6):  # SO_REUSEPORT spreads them over both workers
            ua = TlsUA(*stack.tls_addr, ca=stack.ca)
            assert ua.request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}").status == 200
            uas.append(ua)
        listed = stack.daemon.request("list")["conns"]
        by_peer = {c["conn"]["peer"]: c["conn"]["id"] for c in listed}
        ids = [by_peer[format_addr(*ua.local)] for ua in uas]
        victim = (ids[0] - 1) % 2
        pids = worker_pids(stack.daemon.log)
        os.kill(pids[victim], signal.SIGKILL)
        for ua, conn_id in zip(uas, ids, strict=True):
            if (conn_id - 1) % 2 == victim:
                stack.events.wait_for(lambda e, c=conn_id: e.type == "conn.closed"
                                      and e.conn.id == c and e.reason == "worker_died")
            else:  # the other worker's connections carry on
                assert ua.request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}").status == 200
        wait_until(lambda: len(re.findall(r"worker \d+: pid", stack.daemon.log.read_text())) > 2,
                   10, "the worker to be restarted")
        time.sleep(1.0)  # the new worker listens
        for _ in range(4):
            fresh = TlsUA(*stack.tls_addr, ca=stack.ca)
            try:
                assert fresh.request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}").status == 200
            finally:
                fresh.close()
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
