"""The facts map inside a real Kamailio worker (README "How it works"): a connection's first
message takes its facts from the map; on a miss (no entry, a torn or overwritten one) the
worker falls back to the look-up and still gets the right facts; a stale entry (another
connection's, from the same hairpin port) is never used.

The test damages the map between the handshake and the first message: the daemon has written
the entry (tls.established is published after it) and Kamailio reads it only when that message
arrives. tests/faults/kemi_faults.py answers each OPTIONS with X-Facts-From: the bridge's
counters that moved while it found the facts (map_hits, lookups, cache_hits...), and X-Worker.

A worker learns our own certificate (named in the map by its fingerprint) from its first
look-up: its first connection always takes the look-up. The module warms every worker first,
and each test checks that its message went to a worker that had taken facts from the map.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.lab import Lab, lab_stack
from tests.support.sip import TlsUA
from tlsbridge.shared import events as ev
from tlsbridge.shared import factsmap as fm
from tlsbridge.shared.addr import format_addr, parse_addr
from tlsbridge.shared.events import ConnRef, Event

pytestmark = [pytest.mark.integration]


WARM: set[str] = set()  # Kamailio workers (pids) that have taken facts from the map


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory,
        fault_certs: dict[str, Path]) -> Iterator[Lab]:
    with lab_stack(tmp_path_factory.mktemp("facts-map"), fault_certs) as lab:
        WARM.clear()
        hits = 0
        for _ in range(40):  # until the map has served ten first messages in a row
            ua = lab.ua()
            try:
                reply = lab.options(ua)
            finally:
                ua.close()
            if reply.get("X-Facts-From") == "map_hits":
                WARM.add(reply.get("X-Worker"))
                hits += 1
                if hits >= 10:
                    break
            else:
                hits = 0
        assert hits >= 10, "the facts map never served ten first messages in a row"
        yield lab


def connected(lab: Lab) -> tuple[TlsUA, Event]:
    """A TLS connection that has sent nothing yet, and its tls.established."""
    ua = lab.ua()
    peer = format_addr(*ua.local)
    est = lab.events.wait_for(lambda e: e.type == ev.TLS_ESTABLISHED and e.conn.peer == peer)
    return ua, est


def ask(lab: Lab, ua: TlsUA) -> tuple[str, dict[str, str]]:
    reply = lab.options(ua)
    assert reply.status == 200, reply.first_line
    worker = reply.get("X-Worker")
    assert worker in WARM, f"worker {worker} never took facts from the map (warm: {WARM})"
    return reply.get("X-Facts-From"), lab.x_tls(reply)


def expected(ua: TlsUA) -> dict[str, str]:
    return {"version": ua.sock.version(), "cipher": ua.sock.cipher()[0], "sni": "localhost",
            "peer": format_addr(*ua.local), "verified": "0"}


class MapFile:
    """The daemon's facts map, opened read-write by the test to damage or forge entries."""

    def __init__(self, lab: Lab) -> None:
        self.path = fm.facts_map_of(lab.workdir)
        fd = os.open(self.path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _, _, self.regions, self.size = fm._HEADER.unpack_from(self.mm, 0)

    def slot_at(self, port: int) -> int:
        return fm.INDEX_OFFSET + port * 8

    def entry_at(self, port: int) -> int:
        (slot,) = struct.unpack_from("<Q", self.mm, self.slot_at(port))
        assert slot, f"no map entry for hairpin port {port}: nothing to damage"
        region, pos = slot >> 56, slot & ((1 << 56) - 1)
        return fm.REGIONS_OFFSET + region * self.size + pos % self.size

    def close(self) -> None:
        self.mm.close()


@pytest.fixture
def facts_map(lab: Lab) -> Iterator[MapFile]:
    m = MapFile(lab)
    yield m
    m.close()


def test_a_first_message_takes_its_facts_from_the_map(lab: Lab) -> None:
    ua, _ = connected(lab)
    try:
        source, xtls = ask(lab, ua)
        assert source == "map_hits" and xtls == expected(ua), (source, xtls)
        source, xtls = ask(lab, ua)  # then the worker's own cache
        assert source == "cache_hits" and xtls == expected(ua), (source, xtls)
    finally:
        ua.close()


@pytest.mark.parametrize("damage", ["no_entry", "torn_entry"])
def test_a_miss_falls_back_to_the_lookup(lab: Lab, facts_map: MapFile, damage: str) -> None:
    ua, est = connected(lab)
    try:
        port = parse_addr(est.conn.hairpin)[1]
        if damage == "no_entry":  # as after a too big entry: the index slot is empty
            struct.pack_into("<Q", facts_map.mm, facts_map.slot_at(port), 0)
        else:  # one byte of the data changed: the crc no longer matches (torn, overwritten)
            at = facts_map.entry_at(port) + fm._ENTRY.size + 3
            facts_map.mm[at] ^= 0xFF
        source, xtls = ask(lab, ua)
        assert source == "lookups", f"facts from {source} despite the {damage}"
        assert xtls == expected(ua), xtls
    finally:
        ua.close()


@pytest.mark.parametrize("stale", ["other_peer", "other_hairpin"])
def test_a_stale_entry_is_never_used(lab: Lab, stale: str) -> None:
    """The port's entry is a valid one (crc and all) of another connection: an earlier hairpin
    from that port (another peer), or a hairpin of another address with that port."""
    ua, est = connected(lab)
    try:
        port = parse_addr(est.conn.hairpin)[1]
        facts = lab.daemon.request("lookup", hairpin=est.conn.hairpin)["tls"]
        forged_tls = dict(facts, cipher="STALE-CIPHER", version="TLSv1.0")
        peer = "6.6.6.6:1" if stale == "other_peer" else est.conn.peer
        hairpin = est.conn.hairpin if stale == "other_peer" else format_addr("127.0.0.2", port)
        forged = ConnRef(est.conn.id + 1_000_000, peer, "in", hairpin, est.conn.listener)
        writer = fm.FactsMapWriter(fm.facts_map_of(lab.workdir), 0)
        try:
            assert writer.put(port, fm.encode_entry(forged, forged_tls))
        finally:
            writer.close()
        assert fm.FactsMapReader(fm.facts_map_of(lab.workdir)).get(port) is not None
        source, xtls = ask(lab, ua)
        assert xtls == expected(ua), f"the stale entry was used: {xtls}"
        assert source == "lookups", source
    finally:
        ua.close()
