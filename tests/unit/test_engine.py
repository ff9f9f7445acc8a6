"""daemon/engines OpenSSLEngine, sans-IO: two engines joined by shuttling bytes in memory."""

from __future__ import annotations

import random
import ssl
from pathlib import Path

import pytest
import trustme

from tlsbridge.daemon.certinfo import cert_info_from_pem_file
from tlsbridge.daemon.config import ServerProfile
from tlsbridge.daemon.engines.base import TlsEngine, TlsError
from tlsbridge.daemon.engines.openssl import OpenSSLEngine
from tlsbridge.daemon.tls_context import server_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return d


def profile(certs: Path, **kw: object) -> ServerProfile:
    return ServerProfile(
        name="test", certificate=certs / "server.pem", private_key=certs / "server.key", **kw
    )


def client_ctx(ca: trustme.CA | None) -> ssl.SSLContext:
    if ca is None:
        return ssl.create_default_context()  # the system's CAs, which never include trustme's
    # With cadata, create_default_context trusts only the test CA.
    return ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())


def pair(
    certs: Path, ca: trustme.CA | None, *, client: ssl.SSLContext | None = None, **kw: object
) -> tuple[OpenSSLEngine, OpenSSLEngine]:
    server = OpenSSLEngine(
        server_context(profile(certs, **kw)),
        server_side=True,
        local_cert=cert_info_from_pem_file(certs / "server.pem"),
    )
    cli = OpenSSLEngine(
        client if client is not None else client_ctx(ca),
        server_side=False,
        server_hostname="localhost",
    )
    return cli, server


def pump(a: TlsEngine, b: TlsEngine) -> bool:
    """Move pending ciphertext both ways once; True if anything moved."""
    moved = False
    for src, dst in ((a, b), (b, a)):
        data = src.outgoing()
        if data:
            dst.receive(data)
            moved = True
    return moved


def handshake(cli: TlsEngine, srv: TlsEngine) -> None:
    for _ in range(20):
        done = [e.handshake() for e in (cli, srv)]
        moved = pump(cli, srv)
        if all(done) and not moved:
            return
    raise AssertionError("handshake did not finish")


def transfer(src: TlsEngine, dst: TlsEngine, data: bytes, chunk: int) -> bytes:
    got = []
    for i in range(0, len(data), chunk):
        src.write(data[i : i + chunk])
        pump(src, dst)
        got.append(dst.read())
    pump(src, dst)
    got.append(dst.read())
    return b"".join(got)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_handshake(certs: Path, ca: trustme.CA, version: str) -> None:
    cli, srv = pair(certs, ca, min_version=version, max_version=version)
    assert not cli.handshake_done and not srv.handshake_done
    handshake(cli, srv)
    assert cli.handshake_done and srv.handshake_done
    server_facts, client_facts = srv.facts(), cli.facts()
    assert server_facts.version == client_facts.version == version
    assert server_facts.cipher == client_facts.cipher
    assert server_facts.cipher and server_facts.cipher_bits >= 128
    assert server_facts.sni == "localhost"  # seen by the sni_callback of tls_context
    assert client_facts.sni == "localhost"
    assert server_facts.engine == "openssl"
    # No client certificate was asked for.
    assert not server_facts.peer_cert_present and server_facts.peer is None
    assert server_facts.local is not None and "localhost" in server_facts.local.san_dns
    # The client verified the server against the CA.
    assert client_facts.peer_verified and client_facts.peer is not None
    assert "localhost" in client_facts.peer.san_dns
    assert not server_facts.resumed


def test_handshake_is_idempotent_after_completion(certs: Path, ca: trustme.CA) -> None:
    cli, srv = pair(certs, ca)
    handshake(cli, srv)
    assert cli.handshake() and srv.handshake()
    assert cli.outgoing() == b"" and srv.outgoing() == b""


def test_no_sni_when_client_sends_none(certs: Path, ca: trustme.CA) -> None:
    ctx = client_ctx(ca)
    ctx.check_hostname = False
    srv = OpenSSLEngine(server_context(profile(certs)), server_side=True)
    cli = OpenSSLEngine(ctx, server_side=False)
    handshake(cli, srv)
    assert srv.facts().sni is None


def test_alpn(certs: Path, ca: trustme.CA) -> None:
    ctx = client_ctx(ca)
    ctx.set_alpn_protocols(["sip"])
    cli, srv = pair(certs, ca, client=ctx, alpn=("sip",))
    handshake(cli, srv)
    assert srv.facts().alpn == cli.facts().alpn == "sip"


def test_client_certificate_verified(certs: Path, ca: trustme.CA) -> None:
    ctx = client_ctx(ca)
    ca.issue_cert("client.example.net").configure_cert(ctx)
    cli, srv = pair(certs, ca, client=ctx, ca_list=certs / "ca.pem", verify_client="on")
    handshake(cli, srv)
    facts = srv.facts()
    assert facts.peer_cert_present and facts.peer_verified and facts.verify_error is None
    assert facts.peer is not None and facts.peer.san_dns == ("client.example.net",)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_plaintext_both_ways(certs: Path, ca: trustme.CA, version: str) -> None:
    cli, srv = pair(certs, ca, min_version=version, max_version=version)
    handshake(cli, srv)
    cli.write(b"OPTIONS sip:kamailio SIP/2.0\r\n\r\n")
    pump(cli, srv)
    assert srv.read() == b"OPTIONS sip:kamailio SIP/2.0\r\n\r\n"
    srv.write(b"SIP/2.0 200 OK\r\n\r\n")
    pump(cli, srv)
    assert cli.read() == b"SIP/2.0 200 OK\r\n\r\n"
    assert cli.read() == b"" and srv.read() == b""
    assert not cli.peer_closed and not srv.peer_closed


def test_one_mebibyte_each_way_byte_exact(certs: Path, ca: trustme.CA) -> None:
    cli, srv = pair(certs, ca)
    handshake(cli, srv)
    rng = random.Random(1)
    up = rng.randbytes(1 << 20)
    down = rng.randbytes(1 << 20)
    assert transfer(cli, srv, up, 16 * 1024 + 7) == up
    assert transfer(srv, cli, down, 100_000) == down


def test_buffered_ciphertext_read_in_one_go(certs: Path, ca: trustme.CA) -> None:
    # Many records delivered at once: read() returns all of them (beyond READ_CHUNK).
    cli, srv = pair(certs, ca)
    handshake(cli, srv)
    data = bytes(range(256)) * 1024
    for i in range(0, len(data), 4000):
        cli.write(data[i : i + 4000])
    pump(cli, srv)
    assert srv.read() == data


def test_partial_records(certs: Path, ca: trustme.CA) -> None:
    cli, srv = pair(certs, ca)
    handshake(cli, srv)
    cli.write(b"hello over tls")
    wire = cli.outgoing()
    got = b""
    for i in range(len(wire)):
        srv.receive(wire[i : i + 1])
        got += srv.read()
    assert got == b"hello over tls"


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_notify(certs: Path, ca: trustme.CA, closer: str) -> None:
    cli, srv = pair(certs, ca)
    handshake(cli, srv)
    a, b = (cli, srv) if closer == "client" else (srv, cli)
    a.write(b"last words")
    a.close()
    pump(a, b)
    assert b.read() == b"last words"
    assert b.peer_closed
    assert not a.peer_closed
    # The other side answers with its own close_notify.
    b.close()
    pump(a, b)
    assert a.read() == b""
    assert a.peer_closed


def test_eof_without_close_notify(certs: Path, ca: trustme.CA) -> None:
    cli, srv = pair(certs, ca)
    handshake(cli, srv)
    cli.write(b"truncated?")
    pump(cli, srv)
    srv.receive_eof()
    assert srv.read() == b"truncated?"
    assert srv.peer_closed


@pytest.mark.parametrize("sent", [0, 10], ids=["nothing", "partial-client-hello"])
def test_eof_in_handshake_reason(certs: Path, ca: trustme.CA, sent: int) -> None:
    cli, srv = pair(certs, ca)
    cli.handshake()
    srv.receive(cli.outgoing()[:sent])
    srv.receive_eof()
    with pytest.raises(TlsError) as info:
        srv.handshake()
    assert info.value.reason == "eof_in_handshake"


@pytest.mark.parametrize(
    "garbage",
    [
        b"OPTIONS sip:kamailio SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.1\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x00\x00\x00\x00\x00",
        bytes(range(256)),
    ],
    ids=["plaintext-sip", "bad-client-hello", "binary"],
)
def test_garbage_in_handshake(certs: Path, garbage: bytes) -> None:
    srv = OpenSSLEngine(server_context(profile(certs)), server_side=True)
    srv.receive(garbage)
    with pytest.raises(TlsError) as info:
        srv.handshake()
    assert info.value.reason == "handshake_failed"
    assert info.value.detail
    assert str(info.value).startswith("handshake_failed: ")
    assert not srv.handshake_done


def test_untrusted_server_certificate(certs: Path) -> None:
    cli, srv = pair(certs, None)
    with pytest.raises(TlsError) as info:
        handshake(cli, srv)
    assert info.value.reason == "verify_failed"
    assert "certificate" in info.value.detail
    assert not cli.handshake_done
    # The client tells the server why; the server's handshake fails as well.
    pump(cli, srv)
    with pytest.raises(TlsError) as info:
        srv.handshake()
    assert info.value.reason == "handshake_failed"


def test_wrong_server_name(certs: Path, ca: trustme.CA) -> None:
    srv = OpenSSLEngine(server_context(profile(certs)), server_side=True)
    cli = OpenSSLEngine(client_ctx(ca), server_side=False, server_hostname="other.example")
    with pytest.raises(TlsError) as info:
        handshake(cli, srv)
    assert info.value.reason == "verify_failed"


def test_missing_client_certificate(certs: Path, ca: trustme.CA) -> None:
    cli, srv = pair(certs, ca, ca_list=certs / "ca.pem", verify_client="on")
    with pytest.raises(TlsError) as info:
        handshake(cli, srv)
    # TLS 1.3: the server notices after the client's Finished.
    assert info.value.reason == "handshake_failed"
    assert not srv.handshake_done


def test_facts_before_handshake(certs: Path, ca: trustme.CA) -> None:
    cli, _ = pair(certs, ca)
    with pytest.raises(ValueError, match="not completed"):
        cli.facts()
