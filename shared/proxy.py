"""PROXY protocol v1 (text) and v2 (binary) codec, sans-IO.

Follows HAProxy's proxy-protocol.txt. Bytes go in, frozen values come out; nothing
here touches a socket. `parse` works on a buffer, `ProxyDecoder` on a stream of chunks.
Decoding is strict: anything the spec does not allow raises `ProxyError`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from crc32c import crc32c as _crc32c

__all__ = [
    "DEFAULT_MAX_SIZE",
    "KAMAILIO_V2_MAX",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LEN",
    "V2_HEADER_LEN",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "Family",
    "ProxyDecoder",
    "ProxyError",
    "ProxyHeader",
    "ProxyIncomplete",
    "SslTlv",
    "Tlv",
    "encode_v1",
    "encode_v2",
    "parse",
]

Address = tuple[str, int]
Command = Literal["PROXY", "LOCAL"]
Family = Literal["TCP4", "TCP6", "UDP4", "UDP6", "UNIX", "UNKNOWN"]

V1_MAX_LEN: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LEN: Final = 16
DEFAULT_MAX_SIZE: Final = 0xFFFF + V2_HEADER_LEN
KAMAILIO_V2_MAX: Final = 232

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

_V1_PREFIX = b"PROXY "
_V1_BAD_BYTE = re.compile(rb"[^\x20-\x7e]")
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_FAMILIES: Final = frozenset({"TCP4", "TCP6", "UDP4", "UDP6", "UNIX", "UNKNOWN"})
# family/transport byte -> (family name, address block length)
_V2_FAMILIES: Final[dict[int, tuple[Family, int]]] = {
    0x00: ("UNKNOWN", 0),
    0x11: ("TCP4", 12),
    0x12: ("UDP4", 12),
    0x21: ("TCP6", 36),
    0x22: ("UDP6", 36),
    0x31: ("UNIX", 216),
    0x32: ("UNIX", 216),
}
_V2_COMMANDS: Final[dict[int, Command]] = {0x0: "LOCAL", 0x1: "PROXY"}
_TLV_HEAD = struct.Struct("!BH")
_SSL_HEAD = struct.Struct("!BI")

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyError(ValueError):
    """Malformed PROXY header, or values that cannot be encoded."""


class ProxyIncomplete(ProxyError):
    """The bytes so far are a valid prefix; more are needed."""


@dataclass(frozen=True, slots=True)
class Tlv:
    """One v2 type-length-value record."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if isinstance(self.type, bool) or not isinstance(self.type, int):
            raise ProxyError(f"TLV type must be an int, got {self.type!r}")
        if not 0 <= self.type <= 0xFF:
            raise ProxyError(f"TLV type {self.type} out of range 0..255")
        if not isinstance(self.value, bytes | bytearray | memoryview):
            raise ProxyError(f"TLV value must be bytes, got {type(self.value).__name__}")
        object.__setattr__(self, "value", bytes(self.value))
        if len(self.value) > 0xFFFF:
            raise ProxyError(f"TLV 0x{self.type:02x} value is {len(self.value)} bytes, max 65535")

    def to_bytes(self) -> bytes:
        """Wire form: type, 16-bit length, value."""
        return _TLV_HEAD.pack(self.type, len(self.value)) + self.value


@dataclass(frozen=True, slots=True)
class SslTlv:
    """Contents of a PP2_TYPE_SSL TLV: client flags, verify result, sub-TLVs."""

    client: int = 0
    verify: int = 0
    tlvs: tuple[Tlv, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.client, bool) or not isinstance(self.client, int):
            raise ProxyError(f"SSL client flags must be an int, got {self.client!r}")
        if not 0 <= self.client <= 0xFF:
            raise ProxyError(f"SSL client flags {self.client} out of range 0..255")
        if isinstance(self.verify, bool) or not isinstance(self.verify, int):
            raise ProxyError(f"SSL verify must be an int, got {self.verify!r}")
        if not 0 <= self.verify <= 0xFFFFFFFF:
            raise ProxyError(f"SSL verify {self.verify} out of range 0..2**32-1")
        tlvs = tuple(self.tlvs)
        for sub in tlvs:
            if not isinstance(sub, Tlv):
                raise ProxyError(f"SSL sub-TLVs must be Tlv, got {type(sub).__name__}")
        object.__setattr__(self, "tlvs", tlvs)

    def encode(self) -> Tlv:
        """Pack into a PP2_TYPE_SSL Tlv."""
        body = _SSL_HEAD.pack(self.client, self.verify) + b"".join(t.to_bytes() for t in self.tlvs)
        if len(body) > 0xFFFF:
            raise ProxyError(f"SSL TLV value is {len(body)} bytes, max 65535")
        return Tlv(PP2_TYPE_SSL, body)

    @classmethod
    def decode(cls, tlv: Tlv) -> SslTlv:
        """Unpack a PP2_TYPE_SSL Tlv; ProxyError if malformed."""
        if tlv.type != PP2_TYPE_SSL:
            raise ProxyError(f"not an SSL TLV: type 0x{tlv.type:02x}")
        if len(tlv.value) < _SSL_HEAD.size:
            raise ProxyError(f"SSL TLV is {len(tlv.value)} bytes, needs at least 5")
        client, verify = _SSL_HEAD.unpack_from(tlv.value)
        subs = _parse_tlvs(tlv.value, _SSL_HEAD.size, len(tlv.value), "SSL sub-TLV")
        return cls(client, verify, tuple(t for _, t in subs))

    def get(self, subtype: int) -> bytes | None:
        """Value of the first sub-TLV of this type, or None."""
        return next((t.value for t in self.tlvs if t.type == subtype), None)

    def _text(self, subtype: int) -> str | None:
        raw = self.get(subtype)
        return None if raw is None else raw.decode("utf-8", "replace")

    @property
    def verified(self) -> bool:
        """True when the client presented a certificate that verified (verify == 0)."""
        return self.verify == 0

    @property
    def version(self) -> str | None:
        return self._text(PP2_SUBTYPE_SSL_VERSION)

    @property
    def cn(self) -> str | None:
        return self._text(PP2_SUBTYPE_SSL_CN)

    @property
    def cipher(self) -> str | None:
        return self._text(PP2_SUBTYPE_SSL_CIPHER)

    @property
    def sig_alg(self) -> str | None:
        return self._text(PP2_SUBTYPE_SSL_SIG_ALG)

    @property
    def key_alg(self) -> str | None:
        return self._text(PP2_SUBTYPE_SSL_KEY_ALG)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY header.

    src/dst are (address, port); None for LOCAL and for UNKNOWN. For UNIX they are
    (path, 0). tlvs are kept in wire order, including any CRC32C and NOOP records.
    """

    version: int
    command: Command
    family: Family
    src: Address | None
    dst: Address | None
    tlvs: tuple[Tlv, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tlvs", tuple(self.tlvs))
        if self.version not in (1, 2):
            raise ProxyError(f"version must be 1 or 2, got {self.version!r}")
        if self.command not in _V2_COMMANDS.values():
            raise ProxyError(f"command must be PROXY or LOCAL, got {self.command!r}")
        if self.family not in _FAMILIES:
            raise ProxyError(f"unknown family {self.family!r}")
        if self.version == 1 and (
            self.command != "PROXY" or self.family not in ("TCP4", "TCP6", "UNKNOWN") or self.tlvs
        ):
            raise ProxyError("v1 has only PROXY TCP4/TCP6/UNKNOWN and no TLVs")
        addressless = self.command == "LOCAL" or self.family == "UNKNOWN"
        if addressless and (self.src is not None or self.dst is not None):
            raise ProxyError(f"{self.command} {self.family} carries no addresses")
        if not addressless and (self.src is None or self.dst is None):
            raise ProxyError(f"PROXY {self.family} needs src and dst")

    def get(self, tlv_type: int) -> bytes | None:
        """Value of the first TLV of this type, or None."""
        return next((t.value for t in self.tlvs if t.type == tlv_type), None)

    @property
    def ssl(self) -> SslTlv | None:
        """The decoded SSL TLV, if present."""
        tlv = next((t for t in self.tlvs if t.type == PP2_TYPE_SSL), None)
        return None if tlv is None else SslTlv.decode(tlv)


# --- encoding ---------------------------------------------------------------------------


def _to_ip(host: object, what: str) -> _IP:
    if isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address):
        addr: _IP = host
    elif isinstance(host, str):
        try:
            addr = _parse_ip(host)
        except ValueError:
            raise ProxyError(f"{what} address {host!r} is not an IP address") from None
    else:
        raise ProxyError(f"{what} address must be a str, got {type(host).__name__}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ProxyError(f"{what} address {host!r} has a zone index, which PROXY cannot carry")
    return addr


# A daemon writes a header per connection, mostly for the same few listeners and peers:
# parsing and formatting addresses once each keeps ipaddress off its hot path.
@functools.lru_cache(maxsize=4096)
def _parse_ip(host: str) -> _IP:
    return ipaddress.ip_address(host)


@functools.lru_cache(maxsize=4096)
def _ip_text(addr: _IP) -> str:
    return str(addr)


def _to_port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise ProxyError(f"{what} port must be an int, got {port!r}")
    if not 0 <= port <= 0xFFFF:
        raise ProxyError(f"{what} port {port} out of range 0..65535")
    return port


def _endpoint(ep: object, what: str) -> tuple[_IP, int]:
    if not isinstance(ep, tuple | list) or len(ep) != 2:
        raise ProxyError(f"{what} must be an (address, port) pair, got {ep!r}")
    return _to_ip(ep[0], what), _to_port(ep[1], what)


def _endpoints(src: Address | None, dst: Address | None) -> tuple[_IP, int, _IP, int] | None:
    if src is None and dst is None:
        return None
    if src is None or dst is None:
        raise ProxyError("src and dst must both be given or both be None")
    s, sp = _endpoint(src, "source")
    d, dp = _endpoint(dst, "destination")
    if s.version != d.version:
        raise ProxyError(
            f"address family mismatch: source is IPv{s.version}, destination is IPv{d.version}"
        )
    return s, sp, d, dp


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    """Text header; TCP4/TCP6 from the address type, UNKNOWN when both are None."""
    fast = _v1_fast(src, dst)
    if fast is not None:
        return fast
    ep = _endpoints(src, dst)
    if ep is None:
        return b"PROXY UNKNOWN\r\n"
    s, sp, d, dp = ep
    family = "TCP4" if s.version == 4 else "TCP6"
    line = f"PROXY {family} {_ip_text(s)} {_ip_text(d)} {sp} {dp}\r\n".encode("ascii")
    if len(line) > V1_MAX_LEN:
        raise ProxyError(f"v1 line is {len(line)} bytes, max {V1_MAX_LEN}")
    return line


def _v1_fast(src: Address | None, dst: Address | None) -> bytes | None:
    """The daemon's case, one per connection: (str, int) pairs of known addresses. None for
    anything else, which the general path checks and explains."""
    if type(src) is not tuple or type(dst) is not tuple or len(src) != 2 or len(dst) != 2:
        return None
    (sh, sp), (dh, dp) = src, dst
    if type(sh) is not str or type(dh) is not str or type(sp) is not int \
            or type(dp) is not int or not (0 <= sp <= 0xFFFF and 0 <= dp <= 0xFFFF):
        return None
    s, d = _v1_host(sh), _v1_host(dh)
    if s is None or d is None or s[0] != d[0]:
        return None
    return f"PROXY {s[0]} {s[1]} {d[1]} {sp} {dp}\r\n".encode("ascii")


@functools.lru_cache(maxsize=4096)
def _v1_host(host: str) -> tuple[str, str] | None:
    """(TCP4 or TCP6, the address's canonical text), or None if v1 cannot carry it."""
    try:
        addr = _to_ip(host, "")
    except ProxyError:
        return None
    return ("TCP4" if addr.version == 4 else "TCP6"), str(addr)


def _as_tlv(item: object) -> Tlv:
    if isinstance(item, SslTlv):
        return item.encode()
    if not isinstance(item, Tlv):
        raise ProxyError(f"expected Tlv or SslTlv, got {type(item).__name__}")
    if item.type == PP2_TYPE_CRC32C:
        raise ProxyError("do not pass a CRC32C TLV; use crc32c=True")
    if item.type == PP2_TYPE_SSL:
        SslTlv.decode(item)  # never emit an SSL TLV our own decoder would reject
    return item


def encode_v2(
    src: Address | None,
    dst: Address | None,
    tlvs: Iterable[Tlv | SslTlv] = (),
    *,
    command: Command = "PROXY",
    crc32c: bool = False,
    max_size: int | None = None,
) -> bytes:
    """Binary header: TCP4/TCP6 from the address type, UNSPEC when both are None.

    LOCAL takes no addresses. crc32c=True appends a CRC32C TLV over the whole header.
    max_size caps the total header length (e.g. KAMAILIO_V2_MAX).
    """
    if command not in _V2_COMMANDS.values():
        raise ProxyError(f"command must be PROXY or LOCAL, got {command!r}")
    ep = _endpoints(src, dst)
    if command == "LOCAL" and ep is not None:
        raise ProxyError("LOCAL carries no addresses; pass src=None, dst=None")
    if ep is None:
        fam, addr = 0x00, b""
    else:
        s, sp, d, dp = ep
        fam = 0x11 if s.version == 4 else 0x21
        addr = s.packed + d.packed + struct.pack("!HH", sp, dp)
    body = addr + b"".join(_as_tlv(t).to_bytes() for t in tlvs)
    if crc32c:
        body += _TLV_HEAD.pack(PP2_TYPE_CRC32C, 4) + b"\0\0\0\0"
    if len(body) > 0xFFFF:
        raise ProxyError(f"v2 payload is {len(body)} bytes, the length field allows 65535")
    ver_cmd = 0x20 | (1 if command == "PROXY" else 0)
    out = V2_SIGNATURE + bytes((ver_cmd, fam)) + len(body).to_bytes(2, "big") + body
    if crc32c:
        out = out[:-4] + _crc32c(out).to_bytes(4, "big")
    if max_size is not None and len(out) > max_size:
        raise ProxyError(f"v2 header is {len(out)} bytes, over the {max_size}-byte limit")
    return out


# --- decoding ---------------------------------------------------------------------------


def parse(data: bytes | bytearray, *, max_size: int = DEFAULT_MAX_SIZE) -> tuple[ProxyHeader, int]:
    """Decode the header at the start of data; return (header, bytes consumed).

    Raises ProxyIncomplete while data is a valid but unfinished prefix, ProxyError if
    it is malformed. max_size bounds a v2 header's total length.
    """
    if not data:
        raise ProxyIncomplete("need more data: empty buffer")
    if data[0] == _V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data, max_size)
    raise ProxyError(f"bad signature: first byte 0x{data[0]:02x} starts neither v1 nor v2")


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyHeader, int]:
    n = min(len(data), len(_V1_PREFIX))
    if data[:n] != _V1_PREFIX[:n]:
        raise ProxyError(f"bad v1 signature: {bytes(data[:n])!r} is not 'PROXY '")
    window = bytes(data[:V1_MAX_LEN])
    end = window.find(b"\r\n")
    body = window if end < 0 else window[:end]
    if end < 0 and body.endswith(b"\r"):
        body = body[:-1]  # may be the first half of a CRLF still in flight
    bad = _V1_BAD_BYTE.search(body)
    if bad:
        raise ProxyError(
            f"v1 header has invalid byte 0x{bad.group()[0]:02x} at offset "
            f"{bad.start()}; only printable ASCII before CRLF"
        )
    if end < 0:
        if len(window) >= V1_MAX_LEN:
            raise ProxyError(f"v1 header has no CRLF within {V1_MAX_LEN} bytes")
        raise ProxyIncomplete("need more data: v1 line not terminated yet")
    fields = body.decode("ascii").split(" ")
    family = fields[1]
    if family == "UNKNOWN":
        # the spec tells receivers to ignore whatever follows UNKNOWN
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None), end + 2
    if family not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1 bad family {family!r}: expected TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyError(f"v1 {family} needs 6 single-space-separated fields, got {len(fields)}")
    version = 4 if family == "TCP4" else 6
    src = _v1_address(fields[2], version, "source")
    dst = _v1_address(fields[3], version, "destination")
    sport = _v1_port(fields[4], "source")
    dport = _v1_port(fields[5], "destination")
    return ProxyHeader(1, "PROXY", family, (src, sport), (dst, dport)), end + 2


def _v1_address(text: str, version: int, what: str) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"v1 {what} address {text!r} is not a valid IP address") from None
    if addr.version != version:
        raise ProxyError(
            f"v1 {what} address {text!r} is IPv{addr.version}, family mismatch with TCP{version}"
        )
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ProxyError(f"v1 {what} address {text!r} has a zone index")
    return str(addr)


def _v1_port(text: str, what: str) -> int:
    if not _V1_PORT.fullmatch(text):
        raise ProxyError(f"v1 {what} port {text!r} is not a decimal number without leading zeros")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyError(f"v1 {what} port {port} out of range 0..65535")
    return port


def _parse_v2(data: bytes | bytearray, max_size: int) -> tuple[ProxyHeader, int]:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyError(f"bad v2 signature: {bytes(data[:n])!r}")
    # check each fixed byte as soon as it arrives so junk fails fast
    if len(data) > 12:
        ver, cmd = data[12] >> 4, data[12] & 0x0F
        if ver != 2:
            raise ProxyError(f"v2 bad version nibble {ver}, expected 2")
        if cmd not in _V2_COMMANDS:
            raise ProxyError(f"v2 bad command nibble {cmd}, expected 0 (LOCAL) or 1 (PROXY)")
    if len(data) > 13 and data[13] not in _V2_FAMILIES:
        raise ProxyError(f"v2 bad family/protocol byte 0x{data[13]:02x}")
    if len(data) < V2_HEADER_LEN:
        raise ProxyIncomplete("need more data: v2 fixed header incomplete")
    command = _V2_COMMANDS[data[12] & 0x0F]
    family, addr_len = _V2_FAMILIES[data[13]]
    length = int.from_bytes(data[14:16], "big")
    total = V2_HEADER_LEN + length
    if total > max_size:
        raise ProxyError(f"v2 header of {total} bytes exceeds the {max_size}-byte limit")
    if length < addr_len:
        raise ProxyError(
            f"v2 length {length} is shorter than the {addr_len}-byte {family} address block"
        )
    if len(data) < total:
        raise ProxyIncomplete(f"need more data: v2 header is {total} bytes, have {len(data)}")
    raw = bytes(data[:total])

    src = dst = None
    if command == "PROXY" and family != "UNKNOWN":
        src, dst = _v2_addresses(raw[V2_HEADER_LEN : V2_HEADER_LEN + addr_len], family)
    found = _parse_tlvs(raw, V2_HEADER_LEN + addr_len, total, "TLV")
    crcs = [(off, t) for off, t in found if t.type == PP2_TYPE_CRC32C]
    if len(crcs) > 1:
        raise ProxyError(f"v2 header has {len(crcs)} CRC32C TLVs, at most one allowed")
    for off, t in crcs:
        if len(t.value) != 4:
            raise ProxyError(f"CRC32C TLV is {len(t.value)} bytes, must be 4")
        want = int.from_bytes(t.value, "big")
        got = _crc32c(raw[:off] + b"\0\0\0\0" + raw[off + 4 :])
        if got != want:
            raise ProxyError(f"CRC32C mismatch: header says 0x{want:08x}, computed 0x{got:08x}")
    tlvs = tuple(t for _, t in found)
    for t in tlvs:
        if t.type == PP2_TYPE_SSL:
            SslTlv.decode(t)
    return ProxyHeader(2, command, family, src, dst, tlvs), total


def _v2_addresses(block: bytes, family: Family) -> tuple[Address, Address]:
    if family in ("TCP4", "UDP4"):
        s, d = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        sp, dp = struct.unpack("!HH", block[8:12])
        return (str(s), sp), (str(d), dp)
    if family in ("TCP6", "UDP6"):
        s6, d6 = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        sp, dp = struct.unpack("!HH", block[32:36])
        return (str(s6), sp), (str(d6), dp)
    return (_unix_path(block[:108]), 0), (_unix_path(block[108:216]), 0)


def _unix_path(raw: bytes) -> str:
    # a leading NUL marks a Linux abstract socket name, which may itself contain NULs
    name = raw.rstrip(b"\0") if raw[:1] == b"\0" else raw.split(b"\0", 1)[0]
    return name.decode("utf-8", "surrogateescape")


def _parse_tlvs(buf: bytes, start: int, end: int, what: str) -> list[tuple[int, Tlv]]:
    """TLVs in buf[start:end] as (value offset, Tlv); ProxyError on any overrun."""
    out: list[tuple[int, Tlv]] = []
    pos = start
    while pos < end:
        if end - pos < _TLV_HEAD.size:
            raise ProxyError(
                f"{what} header at offset {pos} truncated: {end - pos} bytes left, needs 3"
            )
        tlv_type, length = _TLV_HEAD.unpack_from(buf, pos)
        value_at = pos + _TLV_HEAD.size
        if value_at + length > end:
            raise ProxyError(
                f"{what} 0x{tlv_type:02x} at offset {pos} claims {length} bytes, "
                f"overrunning its container by {value_at + length - end}"
            )
        out.append((value_at, Tlv(tlv_type, buf[value_at : value_at + length])))
        pos = value_at + length
    return out


class ProxyDecoder:
    """Stream decoder: feed() chunks until it returns the header, then read .rest.

    After the header, feed() keeps returning it and appends data to .rest. After an
    error, feed() raises ProxyError again.
    """

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._max_size = max_size
        self._buf = bytearray()
        self._header: ProxyHeader | None = None
        self._rest = bytearray()
        self._error: ProxyError | None = None

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; return the header once complete, else None. ProxyError if malformed."""
        if self._error is not None:
            raise ProxyError(f"decoder already failed: {self._error}")
        if self._header is not None:
            self._rest += data
            return self._header
        self._buf += data
        try:
            header, used = parse(self._buf, max_size=self._max_size)
        except ProxyIncomplete:
            return None
        except ProxyError as exc:
            self._error = exc
            self._buf.clear()
            raise
        self._header = header
        self._rest = self._buf[used:]
        self._buf = bytearray()
        return header

    @property
    def header(self) -> ProxyHeader | None:
        """The decoded header, or None while incomplete."""
        return self._header

    @property
    def done(self) -> bool:
        """True once the header has been decoded."""
        return self._header is not None

    @property
    def rest(self) -> bytes:
        """Bytes received after the header; empty until the header is complete."""
        return bytes(self._rest)
