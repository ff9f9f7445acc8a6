"""The facts map: the TLS facts of live hairpins in shared memory, read without a round trip.

A Kamailio worker that needs the facts of its message's connection reads them here: no
datagram, no context switch to the daemon, no wake-up of the daemon. The daemon writes each
connection's entry before it sends the PROXY header, so the entry is there before Kamailio can
see a byte of the connection. An entry is the msgpack array `[id, peer, direction, hairpin,
listener, tls]`: the look-up's `conn` map by position (a Kamailio worker decodes one per new
connection: no key strings to build), then, as bytes, the msgpack of its `tls` map: most
connections of a listener have byte-identical facts (no client certificate), which a reader
then parses once.

Layout of the file (little-endian), `{run_dir}/facts.map`, best on tmpfs (/run):

    header   64 bytes: magic, version, regions, region size
    index    u64 per hairpin source port: region << 56 | position of the newest entry, 0 = none
    regions  one ring per daemon worker (each process writes only its own: no locks)

An entry sits at `position % region_size` of its ring: u64 position, u32 length, u32 crc32 of
the data, then the data. Rings wrap: an old entry gets overwritten, which a reader notices
(position or crc mismatch) and treats as a miss, as it does a torn read of an entry being
written. On a miss the reader falls back to the datagram look-up, so the map is only ever a
fast path, never the truth. Readers check the entry's hairpin key and peer themselves.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
import zlib
from typing import Any

import msgpack

from tlsbridge.shared.events import ConnRef

MAGIC = b"TLSBFMAP"
VERSION = 3  # 2: msgpack entries; 3: the conn map by position
PORTS = 65536
_HEADER = struct.Struct("<8sIII")  # magic, version, regions, region_size
HEADER_SIZE = 64
INDEX_OFFSET = HEADER_SIZE
INDEX_SIZE = PORTS * 8
REGIONS_OFFSET = INDEX_OFFSET + INDEX_SIZE
_SLOT = struct.Struct("<Q")
_ENTRY = struct.Struct("<QII")  # position, length, crc32
_POSITION_BITS = 56
_POSITION_MASK = (1 << _POSITION_BITS) - 1
DEFAULT_SIZE = 16 << 20
_DIRECTIONS = ("in", "out")


def facts_map_of(run_dir: os.PathLike[str] | str) -> str:
    return os.path.join(run_dir, "facts.map")


def encode_entry(conn: ConnRef, tls: dict[str, Any]) -> bytes:
    return msgpack.packb([conn.id, conn.peer, conn.direction, conn.hairpin, conn.listener,
                          msgpack.packb(tls)])


def decode_entry(data: bytes) -> tuple[ConnRef, bytes]:
    """The connection and its still encoded `tls` map; ValueError if it is not an entry."""
    try:
        id_, peer, direction, hairpin, listener, tls = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a facts map entry: {exc}") from None
    if not (type(id_) is int and type(peer) is str and direction in _DIRECTIONS
            and type(hairpin) is str and type(tls) is bytes
            and (listener is None or type(listener) is str)):
        raise ValueError("not a facts map entry: [id, peer, direction, hairpin, listener, tls]")
    return ConnRef(id_, peer, direction, hairpin, listener), tls


def decode_tls(tls: bytes) -> dict[str, Any]:
    try:
        d = msgpack.unpackb(tls)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"bad tls of a facts map entry: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError("bad tls of a facts map entry: not a map")
    return d


def _align(n: int) -> int:
    return (n + 7) & ~7


def create(path: str, regions: int, size: int = DEFAULT_SIZE) -> None:
    """A new, empty map replacing any old one (readers of the old one see misses and reopen)."""
    region_size = max(64 * 1024, (size // max(regions, 1)) & ~4095)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.ftruncate(fd, REGIONS_OFFSET + regions * region_size)  # sparse: pages on first use
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, regions, region_size), 0)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read_header(mm: mmap.mmap, path: str) -> tuple[int, int]:
    magic, version, regions, region_size = _HEADER.unpack_from(mm, 0)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"{path}: not a tlsbridge facts map of version {VERSION}")
    if len(mm) < REGIONS_OFFSET + regions * region_size:
        raise ValueError(f"{path}: truncated")
    return regions, region_size


class FactsMapWriter:
    """One daemon process's ring. Positions start from the clock, so a restarted worker's
    entries never carry the positions its predecessor's index slots point at."""

    def __init__(self, path: str, region: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        regions, self._size = _read_header(self._mm, path)
        if not 0 <= region < regions:
            raise ValueError(f"{path}: no region {region} (has {regions})")
        self._region = region
        self._base = REGIONS_OFFSET + region * self._size
        self._pos = _align(time.time_ns() // 1000)
        self.max_entry = self._size // 4

    def put(self, port: int, data: bytes) -> int:
        """Publish `data` as the entry of hairpin source `port`; returns the index slot it
        wrote (for `clear`), or 0 if `data` is too big: readers then use the look-up."""
        need = _align(_ENTRY.size + len(data))
        if need > self.max_entry:
            _SLOT.pack_into(self._mm, INDEX_OFFSET + port * 8, 0)
            return 0
        offset = self._pos % self._size
        if offset + need > self._size:  # no entry straddles the ring's end
            self._pos += self._size - offset
            offset = 0
        at = self._base + offset
        pos = self._pos & _POSITION_MASK
        self._mm[at + _ENTRY.size:at + _ENTRY.size + len(data)] = data
        _ENTRY.pack_into(self._mm, at, pos, len(data), zlib.crc32(data))
        slot = self._region << _POSITION_BITS | pos
        _SLOT.pack_into(self._mm, INDEX_OFFSET + port * 8, slot)
        self._pos += need
        return slot

    def clear(self, port: int, slot: int) -> None:
        """Empty `port`'s index slot if it still holds `slot` (what `put` returned)."""
        at = INDEX_OFFSET + port * 8
        if _SLOT.unpack_from(self._mm, at)[0] == slot:
            _SLOT.pack_into(self._mm, at, 0)

    def close(self) -> None:
        self._mm.close()


class FactsMapReader:
    """Opened lazily (after fork); reopened when the daemon has replaced the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mm: mmap.mmap | None = None
        self._ino = 0
        self._regions = 0
        self._size = 0

    def get(self, port: int) -> bytes | None:
        """The newest entry of hairpin source `port`, or None (no map, no entry, overwritten)."""
        found = self._get(port) if self._mm is not None else None
        if found is None and self._reopened():
            found = self._get(port)
        return found

    def _get(self, port: int) -> bytes | None:
        mm = self._mm
        assert mm is not None
        if not 0 <= port < PORTS:
            return None
        (slot,) = _SLOT.unpack_from(mm, INDEX_OFFSET + port * 8)
        region, pos = slot >> _POSITION_BITS, slot & _POSITION_MASK
        if not slot or region >= self._regions:
            return None
        at = REGIONS_OFFSET + region * self._size + pos % self._size
        if at + _ENTRY.size > REGIONS_OFFSET + (region + 1) * self._size:
            return None
        got, length, crc = _ENTRY.unpack_from(mm, at)
        if got != pos or at + _ENTRY.size + length > REGIONS_OFFSET + (region + 1) * self._size:
            return None
        data = mm[at + _ENTRY.size:at + _ENTRY.size + length]
        # The crc is written after the data and checked over the copy: a copy torn by the
        # writer reusing this place (the ring wrapped) does not match.
        if zlib.crc32(data) != crc or _ENTRY.unpack_from(mm, at)[0] != pos:
            return None
        return data

    def _reopened(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if self._mm is not None and st.st_ino == self._ino:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return False
        finally:
            os.close(fd)
        try:
            self._regions, self._size = _read_header(mm, self.path)
        except (ValueError, struct.error):
            mm.close()
            return False
        self.close()
        self._mm, self._ino = mm, st.st_ino
        return True

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
