"""Tests for the TLS facts model (shared/facts.py) and its extraction (daemon/certinfo.py,
daemon/engines/openssl.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tlsbridge.daemon.certinfo import cert_info_from_der, cert_info_from_pem_file
from tlsbridge.daemon.engines.openssl import facts_from_ssl
from tlsbridge.shared.facts import (
    FACTS_VERSION,
    VERIFY_ERROR_NO_PEER_CERT,
    VERIFY_ERROR_NOT_VERIFIED,
    CertInfo,
    DistinguishedName,
    TlsFacts,
    UnknownLocalCertificate,
)

UTC = dt.UTC
NOT_BEFORE = dt.datetime(2025, 11, 26, 20, 0, 0, tzinfo=UTC)
NOT_AFTER = dt.datetime(2026, 11, 26, 20, 0, 0, tzinfo=UTC)


# ---------------------------------------------------------------- certificate helpers

def _name(**attrs: str) -> x509.Name:
    oids = {
        "cn": NameOID.COMMON_NAME,
        "o": NameOID.ORGANIZATION_NAME,
        "ou": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "c": NameOID.COUNTRY_NAME,
        "st": NameOID.STATE_OR_PROVINCE_NAME,
        "l": NameOID.LOCALITY_NAME,
        "uid": NameOID.USER_ID,
        "email": NameOID.EMAIL_ADDRESS,
    }
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


def _build(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    serial: int = 0x0BADC0FFEE,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _fingerprint(der: bytes) -> str:
    # Independent of cryptography's fingerprint(): hashlib over the DER.
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


# ------------------------------------------------------------------ CertInfo extraction

FULL_SUBJECT = dict(
    cn="alice", o="Example Org", ou="Voice", c="DE", st="Berlin", l="Berlin-Mitte",
    uid="alice01", email="alice@example.com",
)


def test_cert_info_all_fields_from_crafted_cert() -> None:
    ca_key, key = _key(), _key()
    issuer = _name(cn="Example CA", o="Example Org", c="DE")
    subject = _name(**FULL_SUBJECT)
    sans: list[x509.GeneralName] = [
        x509.DNSName("sip.example.com"),
        x509.DNSName("example.com"),
        x509.UniformResourceIdentifier("sip:alice@example.com"),
        x509.RFC822Name("alice@example.com"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
    ]
    cert = _build(subject, issuer, key, ca_key, sans=sans)
    info = cert_info_from_der(_der(cert))

    assert info.subject == DistinguishedName(line=subject.rfc4514_string(), **FULL_SUBJECT)
    # RFC 4514 lists RDNs last-first; cryptography has no short name for emailAddress.
    assert info.subject.line == (
        "1.2.840.113549.1.9.1=alice@example.com,UID=alice01,L=Berlin-Mitte,ST=Berlin,"
        "C=DE,OU=Voice,O=Example Org,CN=alice"
    )
    assert info.issuer == DistinguishedName(
        line="C=DE,O=Example Org,CN=Example CA", cn="Example CA", o="Example Org",
        ou=None, c="DE", st=None, l=None, uid=None, email=None,
    )
    assert info.serial == "BADC0FFEE"
    assert info.version == 3
    assert info.not_before == "2025-11-26T20:00:00Z"
    assert info.not_after == "2026-11-26T20:00:00Z"
    assert info.not_before_ts == NOT_BEFORE.timestamp()
    assert info.not_after_ts == NOT_AFTER.timestamp()
    assert not info.expired_at(NOT_AFTER.timestamp())
    assert info.expired_at(NOT_AFTER.timestamp() + 1)
    assert not info.expired_at(NOT_BEFORE.timestamp())
    assert info.san_dns == ("sip.example.com", "example.com")
    assert info.san_uri == ("sip:alice@example.com",)
    assert info.san_email == ("alice@example.com",)
    assert info.san_ip == ("192.0.2.1", "2001:db8::1")
    assert info.fingerprint_sha256 == _fingerprint(_der(cert))
    assert info.pem == _pem(cert)
    assert info.pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert info.self_signed is False


def test_cert_info_multi_valued_attribute_takes_first_and_no_san() -> None:
    key = _key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "first"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "second"),
    ])
    info = cert_info_from_der(_der(_build(subject, _name(cn="CA"), key, _key(), serial=1)))
    assert info.subject.ou == "first"
    assert info.subject.cn is None
    assert info.serial == "1"
    assert (info.san_dns, info.san_uri, info.san_email, info.san_ip) == ((), (), (), ())


def test_self_signed_requires_matching_name_and_own_signature() -> None:
    key = _key()
    name = _name(cn="self", o="Example Org")
    assert cert_info_from_der(_der(_build(name, name, key, key))).self_signed is True
    # Same subject and issuer, but signed by someone else's key: not self-signed.
    assert cert_info_from_der(_der(_build(name, name, key, _key()))).self_signed is False
    # Own key, different issuer name: not self-signed.
    other = _name(cn="other")
    assert cert_info_from_der(_der(_build(name, other, key, key))).self_signed is False


def test_cert_info_from_trustme_identities(tmp_path: Path) -> None:
    # trustme maps "@" identities to RFC822Name, IP literals to IPAddress and the rest to
    # DNSName; it cannot make URI SANs (crafted above instead).
    ca = trustme.CA(organization_name="Example CA Org", organization_unit_name="CA Unit")
    leaf = ca.issue_cert(
        "localhost", "127.0.0.1", "::1", "alice@example.com",
        common_name="alice", organization_name="Example Org", organization_unit_name="SIP",
    )
    path = tmp_path / "leaf.pem"
    # Key first, then leaf, then CA: the first *certificate* must be picked.
    leaf.private_key_pem.write_to_path(path)
    leaf.cert_chain_pems[0].write_to_path(path, append=True)
    ca.cert_pem.write_to_path(path, append=True)
    info = cert_info_from_pem_file(path)

    leaf_cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    assert info.subject.cn == "alice"
    assert info.subject.o == "Example Org"
    assert info.subject.ou == "SIP"
    assert info.subject.line == "CN=alice,OU=SIP,O=Example Org"
    assert info.issuer.o == "Example CA Org"
    assert info.issuer.ou == "CA Unit"
    assert info.issuer.cn is None
    assert info.san_dns == ("localhost",)
    assert info.san_ip == ("127.0.0.1", "::1")
    assert info.san_email == ("alice@example.com",)
    assert info.san_uri == ()
    assert info.serial == f"{leaf_cert.serial_number:X}"
    assert info.version == 3
    assert info.pem == leaf.cert_chain_pems[0].bytes().decode("ascii")
    assert info.fingerprint_sha256 == _fingerprint(_der(leaf_cert))
    assert info.self_signed is False
    assert info == cert_info_from_der(_der(leaf_cert))

    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_path)
    ca_info = cert_info_from_pem_file(ca_path)
    assert ca_info.self_signed is True
    assert ca_info.subject == ca_info.issuer == info.issuer


def test_cert_info_rejects_garbage(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        cert_info_from_der(b"\x30\x03\x02\x01\x00")
    path = tmp_path / "empty.pem"
    path.write_text("no certificate here\n")
    with pytest.raises(ValueError):
        cert_info_from_pem_file(path)


# -------------------------------------------------------------------- real handshakes

@dataclass
class Pki:
    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    server_info: CertInfo
    client_info: CertInfo


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", common_name="sip.example.com")
    client = ca.issue_cert("alice@example.com", common_name="alice")
    tmp = tmp_path_factory.mktemp("pki")
    server.cert_chain_pems[0].write_to_path(tmp / "server.pem")
    client.cert_chain_pems[0].write_to_path(tmp / "client.pem")
    return Pki(
        ca, server, client,
        cert_info_from_pem_file(tmp / "server.pem"),
        cert_info_from_pem_file(tmp / "client.pem"),
    )


@dataclass
class Conn:
    client: ssl.SSLObject
    server: ssl.SSLObject
    sni_seen: list[str | None]


def _contexts(
    pki: Pki, version: ssl.TLSVersion, *, verify_client: bool, client_cert: bool = True,
) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str | None]]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = server_ctx.maximum_version = version
    pki.server.configure_cert(server_ctx)
    if verify_client:
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        pki.ca.configure_trust(server_ctx)
    sni_seen: list[str | None] = []

    def remember_sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni_seen.append(name)

    server_ctx.sni_callback = remember_sni

    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.minimum_version = client_ctx.maximum_version = version
    pki.ca.configure_trust(client_ctx)
    if client_cert:
        pki.client.configure_cert(client_ctx)
    return server_ctx, client_ctx, sni_seen


def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    sni_seen: list[str | None],
    *,
    server_hostname: str = "localhost",
    session: ssl.SSLSession | None = None,
) -> Conn:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname, session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(10):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if c_done and s_done:
            break
    assert c_done and s_done, "handshake did not finish"
    # Move post-handshake messages (TLS 1.3 session tickets) and some data across.
    server.write(b"ping")
    c_in.write(s_out.read())
    assert client.read(4) == b"ping"
    return Conn(client, server, sni_seen)


VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, "TLSv1.2", id="tls12"),
    pytest.param(ssl.TLSVersion.TLSv1_3, "TLSv1.3", id="tls13"),
]
TLS13_BITS = {"TLS_AES_128_GCM_SHA256": 128, "TLS_AES_256_GCM_SHA384": 256,
              "TLS_CHACHA20_POLY1305_SHA256": 256}


def _check_cipher(facts: TlsFacts, obj: ssl.SSLObject, version_name: str) -> None:
    cipher = obj.cipher()
    assert cipher is not None
    assert facts.version == version_name == obj.version()
    assert facts.cipher == cipher[0]
    assert facts.cipher_bits == cipher[2]
    if version_name == "TLSv1.3":
        assert TLS13_BITS[facts.cipher] == facts.cipher_bits
    else:
        assert facts.cipher.startswith("ECDHE-ECDSA-")
        assert facts.cipher_bits in (128, 256)


@pytest.mark.parametrize(("version", "version_name"), VERSIONS)
def test_handshake_with_client_verification(
    pki: Pki, version: ssl.TLSVersion, version_name: str,
) -> None:
    server_ctx, client_ctx, sni_seen = _contexts(pki, version, verify_client=True)
    server_ctx.set_alpn_protocols(["sip", "h2"])
    client_ctx.set_alpn_protocols(["sip"])
    conn = _handshake(server_ctx, client_ctx, sni_seen)
    assert conn.sni_seen == ["localhost"]

    s_facts = facts_from_ssl(conn.server, sni=conn.sni_seen[0], local=pki.server_info)
    _check_cipher(s_facts, conn.server, version_name)
    assert s_facts.sni == "localhost"
    assert s_facts.alpn == "sip"
    assert s_facts.resumed is False
    assert s_facts.peer_cert_present is True
    assert s_facts.peer_verified is True
    assert s_facts.verify_error is None
    assert s_facts.peer == pki.client_info
    assert s_facts.peer is not None and s_facts.peer.subject.cn == "alice"
    assert s_facts.peer.san_email == ("alice@example.com",)
    assert s_facts.local is not None and s_facts.local.subject.cn == "sip.example.com"
    assert s_facts.engine == "openssl"

    c_facts = facts_from_ssl(conn.client, sni=None, local=pki.client_info, engine="test")
    _check_cipher(c_facts, conn.client, version_name)
    assert c_facts.cipher == s_facts.cipher
    assert c_facts.sni == "localhost"
    assert c_facts.alpn == "sip"
    assert c_facts.peer_cert_present is True
    assert c_facts.peer_verified is True
    assert c_facts.verify_error is None
    assert c_facts.peer == pki.server_info
    assert c_facts.local is not None and c_facts.local.subject.cn == "alice"
    assert c_facts.engine == "test"

    _check_round_trip(s_facts)
    _check_round_trip(c_facts)


@pytest.mark.parametrize(("version", "version_name"), VERSIONS)
def test_handshake_without_client_verification(
    pki: Pki, version: ssl.TLSVersion, version_name: str,
) -> None:
    server_ctx, client_ctx, sni_seen = _contexts(pki, version, verify_client=False)
    conn = _handshake(server_ctx, client_ctx, sni_seen)

    # With CERT_NONE the server never asks for the client certificate.
    s_facts = facts_from_ssl(conn.server, sni=conn.sni_seen[0], local=pki.server_info)
    _check_cipher(s_facts, conn.server, version_name)
    assert s_facts.sni == "localhost"
    assert s_facts.alpn is None
    assert s_facts.peer_cert_present is False
    assert s_facts.peer_verified is False
    assert s_facts.verify_error == VERIFY_ERROR_NO_PEER_CERT
    assert s_facts.peer is None
    assert s_facts.local == pki.server_info

    c_facts = facts_from_ssl(conn.client, sni=None, local=None)
    _check_cipher(c_facts, conn.client, version_name)
    assert c_facts.peer_verified is True
    assert c_facts.peer == pki.server_info
    assert c_facts.local is None

    _check_round_trip(s_facts)
    _check_round_trip(c_facts)


@pytest.mark.parametrize(("version", "version_name"), VERSIONS)
def test_client_without_verification_reports_unverified(
    pki: Pki, version: ssl.TLSVersion, version_name: str,
) -> None:
    server_ctx, client_ctx, sni_seen = _contexts(pki, version, verify_client=False)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    conn = _handshake(server_ctx, client_ctx, sni_seen)
    c_facts = facts_from_ssl(conn.client, sni=None, local=None)
    assert c_facts.version == version_name
    assert c_facts.peer_cert_present is True
    assert c_facts.peer_verified is False
    assert c_facts.verify_error == VERIFY_ERROR_NOT_VERIFIED
    assert c_facts.peer == pki.server_info


def test_ip_literal_server_hostname_means_no_sni(pki: Pki) -> None:
    server_ctx, client_ctx, sni_seen = _contexts(pki, ssl.TLSVersion.TLSv1_3, verify_client=True)
    conn = _handshake(server_ctx, client_ctx, sni_seen, server_hostname="127.0.0.1")
    assert conn.sni_seen == [None]
    assert facts_from_ssl(conn.client, sni=None, local=None).sni is None
    assert facts_from_ssl(conn.server, sni=None, local=None).sni is None


def test_failed_client_verification_aborts_handshake(pki: Pki) -> None:
    # The premise of peer_verified: stdlib ssl never completes a handshake whose peer
    # certificate failed verification.
    server_ctx, client_ctx, sni_seen = _contexts(pki, ssl.TLSVersion.TLSv1_3, verify_client=True)
    trustme.CA().issue_cert("mallory@example.com").configure_cert(client_ctx)
    with pytest.raises(ssl.SSLError):
        _handshake(server_ctx, client_ctx, sni_seen)


def test_resumed_session(pki: Pki) -> None:
    server_ctx, client_ctx, sni_seen = _contexts(pki, ssl.TLSVersion.TLSv1_2, verify_client=True)
    first = _handshake(server_ctx, client_ctx, sni_seen)
    assert facts_from_ssl(first.client, sni=None, local=None).resumed is False
    second = _handshake(server_ctx, client_ctx, sni_seen, session=first.client.session)
    assert facts_from_ssl(second.client, sni=None, local=None).resumed is True
    assert facts_from_ssl(second.server, sni="localhost", local=None).resumed is True


def test_facts_before_handshake_raise(pki: Pki) -> None:
    _server_ctx, client_ctx, _ = _contexts(pki, ssl.TLSVersion.TLSv1_3, verify_client=False)
    obj = client_ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ValueError, match="handshake"):
        facts_from_ssl(obj, sni=None, local=None)


# ------------------------------------------------------------------ dict round trips

def _assert_plain(value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            _assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            _assert_plain(v)
    else:
        assert value is None or type(value) in (str, int, bool), repr(value)


def _check_round_trip(facts: TlsFacts) -> None:
    d = facts.to_dict()
    _assert_plain(d)
    assert TlsFacts.from_dict(d) == facts
    assert TlsFacts.from_dict(json.loads(json.dumps(d))) == facts


@pytest.fixture(scope="module")
def sample_facts(pki: Pki) -> TlsFacts:
    ca_key, key = _key(), _key()
    peer = cert_info_from_der(_der(_build(
        _name(**FULL_SUBJECT), _name(cn="Example CA"), key, ca_key,
        sans=[x509.DNSName("example.com"), x509.UniformResourceIdentifier("sip:a@b"),
              x509.RFC822Name("a@b"), x509.IPAddress(ipaddress.ip_address("::1"))],
    )))
    return TlsFacts(
        version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", cipher_bits=256,
        sni="example.com", alpn="sip", resumed=False, peer_cert_present=True,
        peer_verified=True, verify_error=None, peer=peer, local=pki.server_info,
        engine="openssl",
    )


def test_facts_version_constant() -> None:
    assert FACTS_VERSION == 1


def test_round_trip_restores_tuples_and_nested(sample_facts: TlsFacts) -> None:
    d = sample_facts.to_dict()
    _assert_plain(d)
    assert isinstance(d["peer"]["san_uri"], list)
    assert isinstance(d["peer"]["subject"], dict)
    back = TlsFacts.from_dict(json.loads(json.dumps(d)))
    assert back == sample_facts
    assert back.peer is not None and isinstance(back.peer.san_dns, tuple)
    assert isinstance(back.peer.subject, DistinguishedName)
    assert CertInfo.from_dict(d["local"]) == sample_facts.local
    assert DistinguishedName.from_dict(d["peer"]["issuer"]) == sample_facts.peer.issuer  # type: ignore[union-attr]


def test_round_trip_through_msgpack(sample_facts: TlsFacts) -> None:
    msgpack = pytest.importorskip("msgpack")
    d = msgpack.unpackb(msgpack.packb(sample_facts.to_dict()))
    assert TlsFacts.from_dict(d) == sample_facts


def test_round_trip_without_certs(sample_facts: TlsFacts) -> None:
    bare = replace(sample_facts, peer=None, local=None, sni=None, alpn=None,
                   peer_cert_present=False, peer_verified=False,
                   verify_error=VERIFY_ERROR_NO_PEER_CERT)
    d = bare.to_dict()
    assert d["peer"] is None and d["local"] is None
    assert TlsFacts.from_dict(json.loads(json.dumps(d))) == bare


def test_unknown_keys_are_ignored(sample_facts: TlsFacts) -> None:
    d = sample_facts.to_dict()
    d["from_the_future"] = {"x": 1}
    d["peer"]["new_field"] = [1, 2]
    d["peer"]["subject"]["dc"] = "example"
    assert TlsFacts.from_dict(d) == sample_facts


def test_absent_optional_keys_read_as_none(sample_facts: TlsFacts) -> None:
    d = sample_facts.to_dict()
    del d["sni"], d["alpn"], d["peer"]["subject"]["uid"]
    back = TlsFacts.from_dict(d)
    assert back.sni is None and back.alpn is None
    assert back.peer is not None and back.peer.subject.uid is None


@pytest.mark.parametrize("path", [
    ("version",), ("cipher_bits",), ("resumed",), ("engine",),
    ("peer", "serial"), ("peer", "san_ip"), ("peer", "self_signed"),
    ("local", "subject"), ("peer", "subject", "line"),
])
def test_missing_required_key_raises(sample_facts: TlsFacts, path: tuple[str, ...]) -> None:
    d = sample_facts.to_dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(ValueError, match=f"missing required key '{path[-1]}'"):
        TlsFacts.from_dict(d)


@pytest.mark.parametrize(("path", "bad"), [
    (("cipher_bits",), "256"),
    (("cipher_bits",), True),
    (("resumed",), 1),
    (("sni",), 5),
    (("peer",), "not a dict"),
    (("peer", "version"), 3.0),
    (("peer", "san_dns"), "example.com"),
    (("peer", "san_dns"), ["ok", 7]),
    (("peer", "subject"), None),
    (("local", "issuer", "cn"), b"bytes"),
])
def test_wrong_type_raises(sample_facts: TlsFacts, path: tuple[str, ...], bad: Any) -> None:
    d = sample_facts.to_dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(ValueError, match=repr(path[-1])):
        TlsFacts.from_dict(d)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ValueError, match="expected a dict"):
        TlsFacts.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected a dict"):
        CertInfo.from_dict("x")  # type: ignore[arg-type]


def test_our_certificate_by_reference_is_shared_by_those_who_know_it(
        sample_facts: TlsFacts) -> None:
    assert sample_facts.local is not None
    ref = json.loads(json.dumps(sample_facts.to_dict(local_by_reference=True)))
    assert ref["local"] == {"fingerprint_sha256": sample_facts.local.fingerprint_sha256}
    with pytest.raises(UnknownLocalCertificate):
        TlsFacts.from_dict(ref, {})
    with pytest.raises(UnknownLocalCertificate):
        TlsFacts.from_dict(ref)
    known: dict[str, CertInfo] = {}
    whole = TlsFacts.from_dict(sample_facts.to_dict(), known)  # learns our certificate
    assert whole == sample_facts and list(known) == [sample_facts.local.fingerprint_sha256]
    again = TlsFacts.from_dict(ref, known)
    assert again == sample_facts and again.local is whole.local
