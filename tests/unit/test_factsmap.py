"""The facts map (shared/factsmap.py): what one process writes, another reads, or a miss."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from tlsbridge.shared import factsmap
from tlsbridge.shared.factsmap import FactsMapReader, FactsMapWriter


@pytest.fixture
def path(tmp_path: Path) -> str:
    p = str(tmp_path / "facts.map")
    factsmap.create(p, regions=2, size=256 * 1024)
    return p


def entry(n: int, size: int = 100) -> bytes:
    return json.dumps({"n": n, "pad": "x" * size}).encode()


def test_what_a_writer_puts_a_reader_gets(path: str) -> None:
    w = FactsMapWriter(path, 0)
    r = FactsMapReader(path)
    assert r.get(40000) is None
    assert w.put(40000, entry(1))
    assert w.put(40001, entry(2))
    assert r.get(40000) == entry(1)
    assert r.get(40001) == entry(2)
    assert w.put(40000, entry(3))  # the port's newest entry wins
    assert r.get(40000) == entry(3)


def test_each_worker_writes_its_own_region(path: str) -> None:
    w0, w1 = FactsMapWriter(path, 0), FactsMapWriter(path, 1)
    w0.put(1000, entry(0))
    w1.put(1001, entry(1))
    r = FactsMapReader(path)
    assert (r.get(1000), r.get(1001)) == (entry(0), entry(1))
    with pytest.raises(ValueError, match="no region 2"):
        FactsMapWriter(path, 2)


def test_clear_empties_only_the_slot_it_wrote(path: str) -> None:
    w0, w1 = FactsMapWriter(path, 0), FactsMapWriter(path, 1)
    r = FactsMapReader(path)
    old = w0.put(5060, entry(1))
    w1.put(5060, entry(2))  # the port now serves another hairpin
    w0.clear(5060, old)
    assert r.get(5060) == entry(2)
    w1.clear(5060, FactsMapWriter(path, 1).put(5061, entry(3)))  # another port's slot
    assert r.get(5060) == entry(2)


def test_the_ring_wraps_and_overwritten_entries_read_as_misses(path: str) -> None:
    w = FactsMapWriter(path, 0)
    r = FactsMapReader(path)
    for port in range(2000):  # ~2,000 x 130 bytes: twice round a 128 KiB region
        assert w.put(port, entry(port))
    assert r.get(1999) == entry(1999)
    assert r.get(0) is None
    hits = [p for p in range(2000) if r.get(p) == entry(p)]
    assert hits == list(range(hits[0], 2000))  # the newest ones, never a wrong one
    assert all(r.get(p) is None for p in range(hits[0]))


def test_an_entry_too_big_for_the_ring_is_left_to_the_look_up(path: str) -> None:
    w = FactsMapWriter(path, 0)
    r = FactsMapReader(path)
    w.put(7000, entry(1))
    assert w.put(7000, entry(2, size=w.max_entry)) == 0
    assert r.get(7000) is None


def test_a_torn_or_corrupt_entry_is_a_miss(path: str) -> None:
    w = FactsMapWriter(path, 0)
    r = FactsMapReader(path)
    w.put(8000, entry(1))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        at = mm.find(b'"pad"')
        mm[at:at + 1] = b"!"
    assert r.get(8000) is None


def test_a_reader_follows_a_restarted_daemon(path: str) -> None:
    r = FactsMapReader(path)
    FactsMapWriter(path, 0).put(9000, entry(1))
    assert r.get(9000) == entry(1)
    factsmap.create(path, regions=1, size=128 * 1024)  # the daemon starts afresh
    FactsMapWriter(path, 0).put(9001, entry(2))
    assert r.get(9001) == entry(2)
    assert r.get(9000) is None


def test_no_map_or_not_a_map_is_a_miss(tmp_path: Path) -> None:
    assert FactsMapReader(str(tmp_path / "absent")).get(1) is None
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(factsmap.REGIONS_OFFSET + 4096))
    assert FactsMapReader(str(junk)).get(1) is None
    with pytest.raises(ValueError, match="not a tlsbridge facts map"):
        FactsMapWriter(str(junk), 0)


def test_the_file_is_not_for_everyone(path: str) -> None:
    assert os.stat(path).st_mode & 0o777 == 0o640
    factsmap.remove(path)
    factsmap.remove(path)  # twice is fine
    assert not os.path.exists(path)


@pytest.mark.parametrize("region", [0, 1])
def test_the_publisher_clears_what_it_mapped_in_any_region(path: str, region: int) -> None:
    """A worker's slots carry its region in their high bits: the publisher must give back
    exactly what `put` returned (it once packed them into 32 bits, and worker 1 failed)."""
    import collections

    from tlsbridge.daemon.publisher import FactsPublisher
    from tlsbridge.shared.events import ConnRef
    from tlsbridge.shared.facts import TlsFacts

    publisher = FactsPublisher("src", collections.Counter(),
                               facts_map=FactsMapWriter(path, region))
    ref = ConnRef(7, "192.0.2.1:5061", "in", "127.0.0.1:40000", "127.0.0.1:5061")
    facts = TlsFacts(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", cipher_bits=128,
                     sni=None, alpn=None, resumed=False, peer_cert_present=False,
                     peer_verified=False, verify_error="no peer certificate", peer=None,
                     local=None, engine="openssl")
    publisher.map_facts(ref, facts, 40000)
    reader = FactsMapReader(path)
    assert reader.get(40000) is not None
    publisher.unmap(7)
    assert reader.get(40000) is None
