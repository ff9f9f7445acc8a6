"""PROXY protocol v1/v2 codec: known answers, strict rejection, streaming, properties."""

from __future__ import annotations

import ipaddress
import itertools
import re
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsbridge.shared import proxy
from tlsbridge.shared.proxy import (
    DEFAULT_MAX_SIZE,
    KAMAILIO_V2_MAX,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_KEY_ALG,
    PP2_SUBTYPE_SSL_SIG_ALG,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LEN,
    V2_SIGNATURE,
    Address,
    ProxyDecoder,
    ProxyError,
    ProxyHeader,
    ProxyIncomplete,
    SslTlv,
    Tlv,
    encode_v1,
    encode_v2,
    parse,
)

# No example database: keep the test run from writing files into the tree.
FAST = settings(max_examples=120, deadline=None, database=None)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def crc32c_ref(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected), independent of the crc32c package."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tlv_bytes(tlv_type: int, value: bytes) -> bytes:
    return struct.pack("!BH", tlv_type, len(value)) + value


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return SIG + bytes((ver_cmd, fam)) + n.to_bytes(2, "big") + body


IPV4_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443)
V2_TCP4 = v2(0x21, 0x11, IPV4_BLOCK)
V2_TCP6 = v2(
    0x21,
    0x21,
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("2001:db8::2").packed
    + struct.pack("!HH", 5061, 5060),
)
V2_LOCAL = SIG + b"\x20\x00\x00\x00"


def with_crc(header_without_crc_tlv: bytes) -> bytes:
    """Append a CRC32C TLV, fix the length, fill the checksum with the reference CRC."""
    body = header_without_crc_tlv[16:] + tlv_bytes(PP2_TYPE_CRC32C, b"\0\0\0\0")
    raw = header_without_crc_tlv[:14] + len(body).to_bytes(2, "big") + body
    return raw[:-4] + crc32c_ref(raw).to_bytes(4, "big")


# --- constants --------------------------------------------------------------------------


def test_constants_match_spec() -> None:
    assert V2_SIGNATURE == SIG == bytes.fromhex("0D0A0D0A000D0A515549540A")
    assert (PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C) == (1, 2, 3)
    assert (PP2_TYPE_NOOP, PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL, PP2_TYPE_NETNS) == (4, 5, 0x20, 0x30)
    assert (PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_CIPHER) == (
        0x21,
        0x22,
        0x23,
    )
    assert (PP2_SUBTYPE_SSL_SIG_ALG, PP2_SUBTYPE_SSL_KEY_ALG) == (0x24, 0x25)
    assert (PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS) == (1, 2, 4)
    assert V1_MAX_LEN == 107
    assert KAMAILIO_V2_MAX == 232
    assert DEFAULT_MAX_SIZE == 65535 + 16
    assert issubclass(ProxyIncomplete, ProxyError)
    assert issubclass(ProxyError, ValueError)


def test_reference_crc_matches_package() -> None:
    import crc32c

    assert crc32c_ref(b"123456789") == 0xE3069283 == crc32c.crc32c(b"123456789")


# --- v1 known answers -------------------------------------------------------------------

V1_VECTORS = [
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("0.0.0.0", 0), ("0.0.0.0", 0)),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 5061 5060\r\n",
        ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::1", 5061), ("2001:db8::2", 5060)),
    ),
    (
        b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
        ProxyHeader(
            1,
            "PROXY",
            "TCP6",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", "UNKNOWN", None, None)),
    # spec's worst case: the receiver must ignore what follows UNKNOWN, up to 107 bytes
    (
        b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None),
    ),
]


@pytest.mark.parametrize(("wire", "expected"), V1_VECTORS)
def test_v1_known_answers(wire: bytes, expected: ProxyHeader) -> None:
    assert len(wire) <= V1_MAX_LEN
    assert parse(wire) == (expected, len(wire))
    assert parse(wire + b"INVITE sip:x SIP/2.0\r\n") == (expected, len(wire))


def test_v1_spec_line_lengths() -> None:
    assert len(V1_VECTORS[1][0]) == 56
    assert len(V1_VECTORS[4][0]) == 104
    assert len(V1_VECTORS[5][0]) == 15
    assert len(V1_VECTORS[6][0]) == 107


def test_encode_v1_known_answers() -> None:
    assert (
        encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
        == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert (
        encode_v1(("2001:DB8:0:0::1", 5061), ("2001:db8::2", 5060))
        == b"PROXY TCP6 2001:db8::1 2001:db8::2 5061 5060\r\n"
    )
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert (
        encode_v1((ipaddress.ip_address("10.0.0.1"), 1), (ipaddress.ip_address("10.0.0.2"), 2))
        == b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
    )


def test_v1_ipv4_mapped_ipv6_is_tcp6() -> None:
    wire = encode_v1(("::ffff:1.2.3.4", 1), ("::1", 2))
    # the spelling follows the running Python's ipaddress (3.13 switched to dotted quads)
    mapped = str(ipaddress.ip_address("::ffff:1.2.3.4"))
    assert wire == f"PROXY TCP6 {mapped} ::1 1 2\r\n".encode()
    header, _ = parse(b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n")
    assert (header.family, header.src) == ("TCP6", (mapped, 1))


def test_v1_normalises_addresses() -> None:
    header, _ = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n")
    assert header.src == ("2001:db8::1", 1)


# --- v2 known answers -------------------------------------------------------------------


def test_v2_tcp4_known_answer() -> None:
    expected = ProxyHeader(2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert V2_TCP4.hex() == "0d0a0d0a000d0a515549540a2111000cc0a80001c0a8000bdc0401bb"
    assert parse(V2_TCP4) == (expected, 28)
    assert encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == V2_TCP4


def test_v2_tcp6_known_answer() -> None:
    expected = ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 5061), ("2001:db8::2", 5060))
    assert len(V2_TCP6) == 16 + 36
    assert parse(V2_TCP6) == (expected, 52)
    assert encode_v2(("2001:db8::1", 5061), ("2001:db8::2", 5060)) == V2_TCP6


def test_v2_local_known_answer() -> None:
    # HAProxy's health-check header
    assert encode_v2(None, None, command="LOCAL") == V2_LOCAL
    assert parse(V2_LOCAL) == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 16)


def test_v2_proxy_unspec() -> None:
    wire = encode_v2(None, None)
    assert wire == SIG + b"\x21\x00\x00\x00"
    assert parse(wire) == (ProxyHeader(2, "PROXY", "UNKNOWN", None, None), 16)


def test_v2_local_ignores_address_block_but_keeps_tlvs() -> None:
    wire = v2(0x20, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_NOOP, b""))
    header, used = parse(wire)
    assert used == len(wire)
    assert (header.command, header.family, header.src, header.dst) == ("LOCAL", "TCP4", None, None)
    assert header.tlvs == (Tlv(PP2_TYPE_NOOP, b""),)


def test_v2_udp_and_unix_decode() -> None:
    udp4 = parse(v2(0x21, 0x12, IPV4_BLOCK))[0]
    assert (udp4.family, udp4.src) == ("UDP4", ("192.168.0.1", 56324))
    udp6 = parse(V2_TCP6[:13] + b"\x22" + V2_TCP6[14:])[0]
    assert (udp6.family, udp6.dst) == ("UDP6", ("2001:db8::2", 5060))
    src = b"/run/kamailio.sock".ljust(108, b"\0")
    dst = b"\0abstract".ljust(108, b"\0")
    for fam in (0x31, 0x32):
        unix = parse(v2(0x21, fam, src + dst))[0]
        assert unix.family == "UNIX"
        assert unix.src == ("/run/kamailio.sock", 0)
        assert unix.dst == ("\0abstract", 0)


def test_v2_with_tlvs_known_answer() -> None:
    ssl_value = (
        bytes([PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN])
        + (0).to_bytes(4, "big")
        + tlv_bytes(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3")
        + tlv_bytes(PP2_SUBTYPE_SSL_CN, "caf\u00e9.example".encode())
        + tlv_bytes(PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_128_GCM_SHA256")
        + tlv_bytes(PP2_SUBTYPE_SSL_SIG_ALG, b"RSA-SHA256")
        + tlv_bytes(PP2_SUBTYPE_SSL_KEY_ALG, b"RSA2048")
    )
    body = (
        IPV4_BLOCK
        + tlv_bytes(PP2_TYPE_ALPN, b"sip/2")
        + tlv_bytes(PP2_TYPE_AUTHORITY, b"sip.example.com")
        + tlv_bytes(PP2_TYPE_SSL, ssl_value)
        + tlv_bytes(PP2_TYPE_UNIQUE_ID, b"\x01\x02")
    )
    wire = with_crc(v2(0x21, 0x11, body))
    header, used = parse(wire + b"payload")
    assert used == len(wire)
    assert header.get(PP2_TYPE_ALPN) == b"sip/2"
    assert header.get(PP2_TYPE_AUTHORITY) == b"sip.example.com"
    assert header.get(PP2_TYPE_UNIQUE_ID) == b"\x01\x02"
    assert header.get(PP2_TYPE_NETNS) is None
    assert [t.type for t in header.tlvs] == [1, 2, 0x20, 5, 3]
    ssl = header.ssl
    assert ssl is not None
    assert ssl.client == PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
    assert ssl.verified
    assert ssl.version == "TLSv1.3"
    assert ssl.cn == "caf\u00e9.example"
    assert ssl.cipher == "TLS_AES_128_GCM_SHA256"
    assert ssl.sig_alg == "RSA-SHA256"
    assert ssl.key_alg == "RSA2048"

    built = encode_v2(
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        [
            Tlv(PP2_TYPE_ALPN, b"sip/2"),
            Tlv(PP2_TYPE_AUTHORITY, b"sip.example.com"),
            ssl,
            Tlv(PP2_TYPE_UNIQUE_ID, b"\x01\x02"),
        ],
        crc32c=True,
    )
    assert built == wire


def test_encode_v2_crc_is_over_whole_header_with_zeroed_field() -> None:
    wire = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), crc32c=True)
    assert wire[-7:-4] == b"\x03\x00\x04"
    assert int.from_bytes(wire[-4:], "big") == crc32c_ref(wire[:-4] + b"\0\0\0\0")
    assert parse(wire)[0].get(PP2_TYPE_CRC32C) == wire[-4:]


def test_ssl_tlv_defaults_and_flags() -> None:
    ssl = SslTlv()
    assert ssl.encode() == Tlv(PP2_TYPE_SSL, b"\0\0\0\0\0")
    assert SslTlv.decode(ssl.encode()) == ssl
    assert ssl.version is None and ssl.cn is None and ssl.get(PP2_SUBTYPE_SSL_CN) is None
    failed = SslTlv(PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS, 1)
    assert not failed.verified
    assert failed.encode().value == b"\x05\x00\x00\x00\x01"


# --- incomplete input and streaming -----------------------------------------------------

VALID_WIRES = [w for w, _ in V1_VECTORS] + [
    V2_TCP4,
    V2_TCP6,
    V2_LOCAL,
    with_crc(v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_ALPN, b"h2"))),
    encode_v2(
        ("2001:db8::1", 1),
        ("2001:db8::2", 2),
        [SslTlv(7, 0, (Tlv(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.2"),)), Tlv(0xE0, b"x" * 40)],
        crc32c=True,
    ),
]


@pytest.mark.parametrize("wire", VALID_WIRES, ids=lambda w: w[:20].hex())
def test_every_prefix_is_incomplete(wire: bytes) -> None:
    expected, _ = parse(wire)
    for i in range(len(wire)):
        with pytest.raises(ProxyIncomplete, match="need more data"):
            parse(wire[:i])
        dec = ProxyDecoder()
        assert dec.feed(wire[:i]) is None
        assert not dec.done and dec.header is None and dec.rest == b""
        assert dec.feed(wire[i:] + b"BODY") == expected
        assert dec.rest == b"BODY"


@pytest.mark.parametrize("wire", VALID_WIRES, ids=lambda w: w[:20].hex())
def test_decoder_byte_by_byte(wire: bytes) -> None:
    payload = b"\r\nSIP/2.0 200 OK\r\n\x00\xff"
    data = wire + payload
    dec = ProxyDecoder()
    results = [dec.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[: len(wire) - 1] == [None] * (len(wire) - 1)
    header = parse(wire)[0]
    assert results[len(wire) - 1 :] == [header] * (len(payload) + 1)
    assert dec.done and dec.header == header
    assert dec.rest == payload


def test_decoder_single_chunk_and_late_payload() -> None:
    dec = ProxyDecoder()
    assert dec.feed(b"") is None
    header = dec.feed(V2_TCP4 + b"abc")
    assert header is not None and header.family == "TCP4"
    assert dec.rest == b"abc"
    assert dec.feed(b"def") == header
    assert dec.rest == b"abcdef"


def test_decoder_stays_failed() -> None:
    dec = ProxyDecoder()
    with pytest.raises(ProxyError, match="signature"):
        dec.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyError, match="already failed"):
        dec.feed(V2_TCP4)


def test_decoder_rejects_oversize_before_buffering_it() -> None:
    dec = ProxyDecoder(max_size=KAMAILIO_V2_MAX)
    with pytest.raises(ProxyError, match="exceeds the 232-byte limit"):
        dec.feed(v2(0x21, 0x11, b"", length=300))


# --- malformed input --------------------------------------------------------------------


def p1(line: str) -> bytes:
    return line.encode("latin-1") + b"\r\n"


MALFORMED = [
    # signatures
    (b"GET / HTTP/1.1\r\n", "bad signature"),
    (b"\x16\x03\x01\x02\x00", "bad signature"),
    (b"PROXY\r\n", "bad v1 signature"),
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad signature"),
    (b"PROXZ", "bad v1 signature"),
    (SIG[:5] + b"\x01", "bad v2 signature"),
    (SIG[:-1] + b"X" + b"\x21\x11\x00\x0c" + IPV4_BLOCK, "bad v2 signature"),
    # v1 framing
    (b"PROXY UNKNOWN " + b"a" * 100, "no CRLF within 107"),
    (b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", "no CRLF within 107"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "invalid byte 0x0a"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "invalid byte 0x0d"),
    (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "invalid byte 0x09"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "invalid byte 0x00"),
    ("PROXY TCP4 1.2.3.\u00e4 5.6.7.8 1 2\r\n".encode(), "invalid byte 0xc3"),
    (b"PROXY UNKNOWN \xff\r\n", "invalid byte 0xff"),
    # v1 family and field count
    (p1("PROXY TCP5 1.2.3.4 5.6.7.8 1 2"), "bad family 'TCP5'"),
    (p1("PROXY tcp4 1.2.3.4 5.6.7.8 1 2"), "bad family 'tcp4'"),
    (p1("PROXY UDP4 1.2.3.4 5.6.7.8 1 2"), "bad family 'UDP4'"),
    (p1("PROXY UNKNOWNX"), "bad family 'UNKNOWNX'"),
    (p1("PROXY "), "bad family ''"),
    (p1("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2"), "bad family ''"),
    (p1("PROXY TCP4"), "needs 6 .* got 2"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 1"), "needs 6 .* got 5"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3"), "needs 6 .* got 7"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 "), "needs 6 .* got 7"),
    (p1("PROXY TCP4 1.2.3.4  5.6.7.8 1 2"), "needs 6 .* got 7"),
    # v1 addresses
    (p1("PROXY TCP4 ::1 5.6.7.8 1 2"), "source address '::1' is IPv6, family mismatch"),
    (p1("PROXY TCP4 1.2.3.4 ::1 1 2"), "destination address '::1' is IPv6, family mismatch"),
    (p1("PROXY TCP6 1.2.3.4 ::1 1 2"), "source address '1.2.3.4' is IPv4, family mismatch"),
    (p1("PROXY TCP4 01.2.3.4 5.6.7.8 1 2"), "source address '01.2.3.4' is not a valid IP"),
    (p1("PROXY TCP4 1.2.3 5.6.7.8 1 2"), "not a valid IP"),
    (p1("PROXY TCP4 1.2.3.256 5.6.7.8 1 2"), "not a valid IP"),
    (p1("PROXY TCP4 localhost 5.6.7.8 1 2"), "not a valid IP"),
    (p1("PROXY TCP6 fe80::1%eth0 ::1 1 2"), "zone index"),
    (p1("PROXY TCP6 ::1::2 ::1 1 2"), "not a valid IP"),
    # v1 ports
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 01 2"), "source port '01' .* leading zeros"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 1 00"), "destination port '00'"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2"), "source port 65536 out of range"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999"), "destination port 99999 out of range"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 123456 2"), "source port '123456'"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2"), "source port '-1'"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 +1 2"), "source port '\\+1'"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2"), "source port '0x10'"),
    (p1("PROXY TCP4 1.2.3.4 5.6.7.8 1 "), "destination port ''"),
    # v2 version / command / family
    (SIG + b"\x11", "bad version nibble 1"),
    (SIG + b"\x31\x11\x00\x0c" + IPV4_BLOCK, "bad version nibble 3"),
    (SIG + b"\x01", "bad version nibble 0"),
    (SIG + b"\x22", "bad command nibble 2"),
    (SIG + b"\x2f\x11\x00\x0c" + IPV4_BLOCK, "bad command nibble 15"),
    (SIG + b"\x21\x10", "bad family/protocol byte 0x10"),
    (SIG + b"\x21\x13", "bad family/protocol byte 0x13"),
    (SIG + b"\x21\x01", "bad family/protocol byte 0x01"),
    (SIG + b"\x21\x02\x00\x00", "bad family/protocol byte 0x02"),
    (SIG + b"\x21\x41", "bad family/protocol byte 0x41"),
    (SIG + b"\x21\x30", "bad family/protocol byte 0x30"),
    (SIG + b"\x20\xff", "bad family/protocol byte 0xff"),
    # v2 length vs address block
    (v2(0x21, 0x11, IPV4_BLOCK[:11]), "length 11 is shorter than the 12-byte TCP4"),
    (v2(0x21, 0x11, b"", length=0), "length 0 is shorter than the 12-byte TCP4"),
    (v2(0x21, 0x21, b"\0" * 35), "length 35 is shorter than the 36-byte TCP6"),
    (v2(0x21, 0x12, b"\0" * 4), "length 4 is shorter than the 12-byte UDP4"),
    (v2(0x21, 0x31, b"\0" * 215), "length 215 is shorter than the 216-byte UNIX"),
    (v2(0x20, 0x11, b"\0" * 3), "length 3 is shorter than the 12-byte TCP4"),
    # TLV structure
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x01"), "TLV header at offset 28 truncated"),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"), "TLV header .* truncated: 2 bytes left"),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x05ab"), "TLV 0x01 .* overrunning .* by 3"),
    (v2(0x21, 0x00, b"\x04\xff\xff"), "TLV 0x04 at offset 16 claims 65535 bytes"),
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(1, b"ok") + b"\x02\x00\x09abc"),
        "TLV 0x02 at offset 33 claims 9 bytes",
    ),
    # SSL TLV
    (v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_SSL, b"")), "SSL TLV is 0 bytes"),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_SSL, b"\1\0\0\0")), "SSL TLV is 4 bytes"),
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_SSL, b"\1\0\0\0\0\x21\x00")),
        "SSL sub-TLV header at offset 5 truncated",
    ),
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_SSL, b"\1\0\0\0\0\x21\x00\x08TLSv1.3")),
        "SSL sub-TLV 0x21 at offset 5 claims 8 bytes",
    ),
    (
        v2(
            0x21,
            0x11,
            IPV4_BLOCK
            + tlv_bytes(PP2_TYPE_SSL, b"\1\0\0\0\0" + tlv_bytes(0x21, b"TLSv1.3") + b"\x22"),
        ),
        "SSL sub-TLV header at offset 15 truncated",
    ),
    # CRC32C
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_CRC32C, b"\0\0\0\0")),
        "CRC32C mismatch: header says 0x00000000",
    ),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_CRC32C, b"\0\0\0")), "CRC32C TLV is 3 bytes"),
    (v2(0x21, 0x00, tlv_bytes(PP2_TYPE_CRC32C, b"\0" * 5)), "CRC32C TLV is 5 bytes"),
    (
        v2(0x21, 0x00, tlv_bytes(PP2_TYPE_CRC32C, b"\0" * 4) * 2),
        "2 CRC32C TLVs, at most one allowed",
    ),
]


@pytest.mark.parametrize(("wire", "message"), MALFORMED, ids=lambda x: repr(x)[:40])
def test_malformed(wire: bytes, message: str) -> None:
    with pytest.raises(ProxyError, match=message) as info:
        parse(wire)
    assert not isinstance(info.value, ProxyIncomplete)
    # the stream decoder reports the same error, however the bytes are chunked
    dec = ProxyDecoder()
    with pytest.raises(ProxyError, match=message):
        for i in range(len(wire)):
            assert dec.feed(wire[i : i + 1]) is None
    assert not dec.done


def test_malformed_fails_fast_on_partial_input() -> None:
    # junk must not be buffered waiting for a CRLF or a length that never comes
    for partial in (b"X", b"PROXY TCP4 1.2.3.4\n", SIG + b"\x31", SIG + b"\x21\x44"):
        with pytest.raises(ProxyError) as info:
            parse(partial)
        assert not isinstance(info.value, ProxyIncomplete)


def test_crc_tamper_detected() -> None:
    wire = encode_v2(("10.0.0.1", 5060), ("10.0.0.2", 5061), [Tlv(1, b"sip")], crc32c=True)
    # every address and TLV byte before the CRC32C TLV itself
    for i in range(16, len(wire) - 7):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        with pytest.raises(ProxyError):
            parse(bytes(bad))
    bad_sum = wire[:-1] + bytes([wire[-1] ^ 0xFF])
    with pytest.raises(ProxyError, match="CRC32C mismatch"):
        parse(bad_sum)


def test_oversized_v2() -> None:
    big = v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes(PP2_TYPE_NOOP, b"\0" * 200))
    assert len(big) == 231
    assert parse(big, max_size=231)[1] == 231
    with pytest.raises(ProxyError, match="header of 231 bytes exceeds the 230-byte limit"):
        parse(big, max_size=230)
    # detected from the fixed header alone, before the body arrives
    with pytest.raises(ProxyError, match="exceeds"):
        parse(big[:16], max_size=230)


def test_v2_maximum_length_accepted_by_default() -> None:
    wire = encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), [Tlv(PP2_TYPE_NOOP, b"\0" * (65535 - 15))])
    assert len(wire) == DEFAULT_MAX_SIZE
    assert parse(wire)[1] == DEFAULT_MAX_SIZE


# --- encoder validation -----------------------------------------------------------------

V4 = ("192.0.2.1", 5060)
V6 = ("2001:db8::1", 5060)


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        (V4, V6, "address family mismatch: source is IPv4, destination is IPv6"),
        (V6, V4, "address family mismatch: source is IPv6"),
        (V4, None, "both be given or both be None"),
        (None, V4, "both be given or both be None"),
        (("192.0.2.1", -1), V4, "source port -1 out of range"),
        (V4, ("192.0.2.2", 65536), "destination port 65536 out of range"),
        (("192.0.2.1", True), V4, "source port must be an int"),
        (("192.0.2.1", "5060"), V4, "source port must be an int"),
        (("example.com", 1), V4, "source address 'example.com' is not an IP"),
        (("01.2.3.4", 1), V4, "not an IP"),
        ((3232235521, 1), V4, "source address must be a str"),
        (("fe80::1%eth0", 1), V6, "zone index"),
        (("192.0.2.1",), V4, r"source must be an \(address, port\) pair"),
        ("192.0.2.1:5060", V4, "pair"),
    ],
)
def test_encoder_rejects_bad_addresses(
    encode: Callable[[object, object], bytes], src: object, dst: object, message: str
) -> None:
    with pytest.raises(ProxyError, match=message):
        encode(src, dst)


def test_encode_v2_rejections() -> None:
    with pytest.raises(ProxyError, match="LOCAL carries no addresses"):
        encode_v2(V4, V4, command="LOCAL")
    with pytest.raises(ProxyError, match="command must be PROXY or LOCAL"):
        encode_v2(V4, V4, command="HEALTH")  # type: ignore[arg-type]
    with pytest.raises(ProxyError, match="use crc32c=True"):
        encode_v2(V4, V4, [Tlv(PP2_TYPE_CRC32C, b"\0\0\0\0")])
    with pytest.raises(ProxyError, match="SSL TLV is 2 bytes"):
        encode_v2(V4, V4, [Tlv(PP2_TYPE_SSL, b"\1\0")])
    with pytest.raises(ProxyError, match="expected Tlv or SslTlv"):
        encode_v2(V4, V4, [(1, b"h2")])  # type: ignore[list-item]
    with pytest.raises(ProxyError, match="length field allows 65535"):
        encode_v2(V4, V4, [Tlv(PP2_TYPE_NOOP, b"\0" * 65535)])


def test_encode_v2_max_size_kamailio() -> None:
    tlv = Tlv(PP2_TYPE_NOOP, b"\0" * (KAMAILIO_V2_MAX - 16 - 12 - 3))
    assert len(encode_v2(V4, V4, [tlv], max_size=KAMAILIO_V2_MAX)) == KAMAILIO_V2_MAX
    with pytest.raises(ProxyError, match="is 239 bytes, over the 232-byte limit"):
        encode_v2(V4, V4, [tlv], crc32c=True, max_size=KAMAILIO_V2_MAX)


def test_value_validation() -> None:
    with pytest.raises(ProxyError, match="TLV type 256 out of range"):
        Tlv(256, b"")
    with pytest.raises(ProxyError, match="TLV type -1 out of range"):
        Tlv(-1, b"")
    with pytest.raises(ProxyError, match="must be bytes"):
        Tlv(1, "h2")  # type: ignore[arg-type]
    with pytest.raises(ProxyError, match="max 65535"):
        Tlv(1, b"\0" * 65536)
    assert Tlv(1, bytearray(b"h2")).value == b"h2"
    with pytest.raises(ProxyError, match="client flags 256 out of range"):
        SslTlv(256)
    with pytest.raises(ProxyError, match="verify -1 out of range"):
        SslTlv(1, -1)
    with pytest.raises(ProxyError, match="verify 4294967296 out of range"):
        SslTlv(1, 2**32)
    with pytest.raises(ProxyError, match="SSL TLV value is 65537 bytes"):
        SslTlv(1, 0, (Tlv(0x21, b"\0" * 65529),)).encode()
    with pytest.raises(ProxyError, match="not an SSL TLV"):
        SslTlv.decode(Tlv(PP2_TYPE_ALPN, b"\0" * 5))
    with pytest.raises(ProxyError, match="v1 has only"):
        ProxyHeader(1, "LOCAL", "UNKNOWN", None, None)
    with pytest.raises(ProxyError, match="needs src and dst"):
        ProxyHeader(2, "PROXY", "TCP4", None, None)
    with pytest.raises(ProxyError, match="carries no addresses"):
        ProxyHeader(2, "LOCAL", "TCP4", V4, V4)


# --- properties -------------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoints = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
plain_tlvs = st.builds(
    Tlv,
    st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_SSL)),
    st.binary(max_size=40),
)
ssl_tlvs = st.builds(
    SslTlv,
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.lists(st.builds(Tlv, st.integers(0, 255), st.binary(max_size=30)), max_size=4).map(tuple),
)
any_tlvs = st.lists(st.one_of(plain_tlvs, ssl_tlvs), max_size=5)
payloads = st.binary(max_size=64)


@FAST
@given(endpoints, payloads)
def test_v1_roundtrip(eps: tuple[tuple[str, int], tuple[str, int]], payload: bytes) -> None:
    src, dst = eps
    wire = encode_v1(src, dst)
    assert len(wire) <= V1_MAX_LEN
    header, used = parse(wire + payload)
    assert used == len(wire)
    family = "TCP4" if ":" not in src[0] else "TCP6"
    assert header == ProxyHeader(1, "PROXY", family, src, dst)
    assert encode_v1(header.src, header.dst) == wire


@FAST
@given(st.one_of(endpoints, st.just((None, None))), any_tlvs, st.booleans(), payloads)
def test_v2_roundtrip(
    eps: tuple[Address | None, Address | None],
    tlvs: list[Tlv | SslTlv],
    crc: bool,
    payload: bytes,
) -> None:
    src, dst = eps
    wire = encode_v2(src, dst, tlvs, crc32c=crc)
    header, used = parse(wire + payload)
    assert used == len(wire)
    expected = tuple(t.encode() if isinstance(t, SslTlv) else t for t in tlvs)
    if crc:
        assert header.tlvs[:-1] == expected
        assert header.tlvs[-1].type == PP2_TYPE_CRC32C and len(header.tlvs[-1].value) == 4
    else:
        assert header.tlvs == expected
    assert (header.version, header.command, header.src, header.dst) == (2, "PROXY", src, dst)
    if src is None:
        assert header.family == "UNKNOWN"
    else:
        assert header.family == ("TCP4" if ":" not in src[0] else "TCP6")
    decoded_ssl = [SslTlv.decode(t) for t in header.tlvs if t.type == PP2_TYPE_SSL]
    assert decoded_ssl == [t for t in tlvs if isinstance(t, SslTlv)]
    # re-encoding the decoded header reproduces the wire bytes exactly
    again = [t for t in header.tlvs if t.type != PP2_TYPE_CRC32C]
    assert encode_v2(header.src, header.dst, again, crc32c=crc) == wire


@FAST
@given(any_tlvs, st.booleans())
def test_v2_local_roundtrip(tlvs: list[Tlv | SslTlv], crc: bool) -> None:
    wire = encode_v2(None, None, tlvs, command="LOCAL", crc32c=crc)
    header, used = parse(wire)
    assert used == len(wire)
    assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, header.tlvs)
    assert len(header.tlvs) == len(tlvs) + crc


@FAST
@given(
    st.one_of(
        endpoints.map(lambda e: encode_v1(*e)),
        st.tuples(endpoints, any_tlvs, st.booleans()).map(
            lambda a: encode_v2(a[0][0], a[0][1], a[1], crc32c=a[2])
        ),
    ),
    payloads,
    st.lists(st.integers(0, 400), max_size=6),
)
def test_decoder_any_chunking(wire: bytes, payload: bytes, cuts: list[int]) -> None:
    data = wire + payload
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    dec = ProxyDecoder()
    seen: ProxyHeader | None = None
    for a, b in itertools.pairwise(bounds):
        got = dec.feed(data[a:b])
        if b < len(wire):
            assert got is None
        else:
            assert got is not None
            seen = got
    assert seen == parse(wire)[0]
    assert dec.rest == payload


@FAST
@given(ssl_tlvs)
def test_ssl_tlv_roundtrip(ssl: SslTlv) -> None:
    tlv = ssl.encode()
    assert tlv.type == PP2_TYPE_SSL
    assert SslTlv.decode(tlv) == ssl


def _decode_only_proxy_errors(data: bytes) -> None:
    try:
        header, used = parse(data)
    except ProxyError as exc:
        assert str(exc)
        return
    assert 0 < used <= len(data)
    assert header.version in (1, 2)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_proxy_error(data: bytes) -> None:
    _decode_only_proxy_errors(data)


@FAST
@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN"]),
    st.text(alphabet="0123456789abcdefABCDEF:. \r\n%-+x\u00e9", max_size=100),
)
def test_v1_like_text_only_raises_proxy_error(prefix: bytes, tail: str) -> None:
    _decode_only_proxy_errors(prefix + tail.encode())


@FAST
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300), st.booleans())
def test_v2_like_bytes_only_raise_proxy_error(
    ver_cmd: int, fam: int, body: bytes, honest_len: bool
) -> None:
    length = len(body) if honest_len else int.from_bytes(body[:2].ljust(2, b"\0"), "big")
    _decode_only_proxy_errors(SIG + bytes((ver_cmd, fam)) + length.to_bytes(2, "big") + body)


@FAST
@given(
    st.tuples(endpoints, any_tlvs, st.booleans()).map(
        lambda a: encode_v2(a[0][0], a[0][1], a[1], crc32c=a[2])
    ),
    st.data(),
)
def test_mutated_v2_only_raises_proxy_error(wire: bytes, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(wire) - 1))
    flipped = wire[:i] + bytes([wire[i] ^ data.draw(st.integers(1, 255))]) + wire[i + 1 :]
    _decode_only_proxy_errors(flipped)
    _decode_only_proxy_errors(wire[:i])


def test_messages_are_meaningful() -> None:
    # every rejection names what was wrong rather than a bare struct/index error
    for wire, _ in MALFORMED:
        with pytest.raises(ProxyError) as info:
            parse(wire)
        assert re.search(r"[a-z]{3,}", str(info.value))
        assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("src, dst", [
    (("198.51.100.7", 40001), ("127.0.0.1", 5061)),
    (("2001:db8:0:0::7", 0), ("::1", 65535)),
    (("::ffff:192.0.2.1", 5060), ("::1", 5061)),
])
def test_v1_fast_path_writes_what_the_checked_path_writes(src: tuple, dst: tuple) -> None:
    fast = proxy._v1_fast(src, dst)
    assert fast is not None
    s, sp, d, dp = proxy._endpoints(src, dst)  # type: ignore[misc]
    family = "TCP4" if s.version == 4 else "TCP6"
    assert fast == f"PROXY {family} {s} {d} {sp} {dp}\r\n".encode()


@pytest.mark.parametrize("src, dst", [
    (("198.51.100.7", True), ("127.0.0.1", 5061)),  # a bool is no port
    (("198.51.100.7", 40001), ("::1", 5061)),  # mixed families
    (("fe80::1%eth0", 1), ("::1", 2)),  # a zone index
    (["198.51.100.7", 40001], ("127.0.0.1", 5061)),  # not a tuple
    (("example.com", 1), ("127.0.0.1", 2)),
])
def test_v1_fast_path_leaves_the_odd_cases_to_the_checked_one(src: object, dst: object) -> None:
    assert proxy._v1_fast(src, dst) is None
