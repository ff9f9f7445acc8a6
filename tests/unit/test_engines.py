"""Every TLS engine, sans-IO, against every other one; then against real TLS tools.

Engines meet in memory (client engine X against server engine Y, all pairs), and over a real
localhost socket against `openssl s_client` and `gnutls-cli` (apt packages openssl, gnutls-bin).
An engine or tool that cannot run here fails its tests with the reason `registry.available()`
gives (a recorded skip with TLSBRIDGE_TEST_ALLOW_MISSING=1: tests/support/requirements.py).
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tlsbridge.daemon.config import ConfigError, ServerProfile
from tlsbridge.daemon.engines import registry
from tlsbridge.daemon.engines.base import TlsEngine, TlsError
from tlsbridge.daemon.engines.registry import ENGINES, client_engine, server_engine_factory
from tlsbridge.shared.facts import VERIFY_ERROR_NO_PEER_CERT, VERIFY_ERROR_NOT_VERIFIED

AVAILABLE = registry.available()
VERSIONS = ("TLSv1.2", "TLSv1.3")


def _engine_param(name: str) -> Any:
    # Always collected: an engine that does not load here fails (tests/conftest.py).
    return pytest.param(name, id=name, marks=pytest.mark.needs_engine(name))


def _pair_param(cli: str, srv: str) -> Any:
    return pytest.param(cli, srv, id=f"{cli}-to-{srv}",
                        marks=[pytest.mark.needs_engine(n) for n in dict.fromkeys((cli, srv))])


EACH = [_engine_param(n) for n in ENGINES]
PAIRS = [_pair_param(c, s) for c in ENGINES for s in ENGINES]
pair_params = pytest.mark.parametrize(("cli_engine", "srv_engine"), PAIRS)
each_server = pytest.mark.parametrize("srv_engine", EACH)
each_version = pytest.mark.parametrize("version", VERSIONS)

# Modes an engine refuses by design (test_openssl_refuses_optional_no_ca proves the refusal):
# pairs whose server engine is one of these are not collected for that mode.
REFUSES: dict[str, tuple[str, ...]] = {
    "optional_no_ca": ("openssl",),  # the stdlib ssl module cannot accept a certificate that
                                     # failed verification
}


def pairs_for(mode: str) -> list[Any]:
    return [p for p in PAIRS if p.values[1] not in REFUSES[mode]]


# ---- certificates -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client = ca.issue_cert("client.example.net")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    rogue = other.issue_cert("rogue.example.net")
    rogue.cert_chain_pems[0].write_to_path(str(d / "rogue.pem"))
    rogue.private_key_pem.write_to_path(str(d / "rogue.key"))
    # A key that belongs to no certificate here.
    ca.issue_cert("spare.example.net").private_key_pem.write_to_path(str(d / "spare.key"))
    return d


def profile(certs: Path, **kw: Any) -> ServerProfile:
    kw.setdefault("name", "test")
    return ServerProfile(certificate=certs / "server.pem", private_key=certs / "server.key", **kw)


def server(engine: str, certs: Path, **kw: Any) -> TlsEngine:
    return server_engine_factory(engine, profile(certs, **kw))()


def client(engine: str, certs: Path, *, who: str | None = None, **kw: Any) -> TlsEngine:
    kw.setdefault("ca_file", certs / "ca.pem")
    kw.setdefault("server_hostname", "localhost")
    if who is not None:
        kw.update(cert=certs / f"{who}.pem", key=certs / f"{who}.key")
    return client_engine(engine, **kw)


# ---- moving bytes -----------------------------------------------------------------------


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


def failed_handshake(cli: TlsEngine, srv: TlsEngine) -> tuple[TlsError | None, TlsError | None]:
    """Drive a handshake that fails; the first error of each side (None if it had none)."""
    errors: dict[int, TlsError] = {}
    for _ in range(20):
        for i, engine in enumerate((cli, srv)):
            if i not in errors and not engine.handshake_done:
                try:
                    engine.handshake()
                except TlsError as exc:
                    errors[i] = exc
        if not pump(cli, srv):
            break
    assert errors, "the handshake did not fail"
    return errors.get(0), errors.get(1)


def connected(
    cli_engine: str, srv_engine: str, certs: Path, *, cli_kw: dict[str, Any] | None = None,
    **srv_kw: Any,
) -> tuple[TlsEngine, TlsEngine]:
    srv = server(srv_engine, certs, **srv_kw)
    cli = client(cli_engine, certs, **(cli_kw or {}))
    handshake(cli, srv)
    return cli, srv


def transfer(src: TlsEngine, dst: TlsEngine, data: bytes, chunk: int) -> bytes:
    got = []
    for i in range(0, len(data), chunk):
        src.write(data[i : i + chunk])
        pump(src, dst)
        got.append(dst.read())
    pump(src, dst)
    got.append(dst.read())
    return b"".join(got)


# ---- engine pairs -----------------------------------------------------------------------


@pair_params
@each_version
def test_handshake_facts(cli_engine: str, srv_engine: str, certs: Path, version: str) -> None:
    srv = server(srv_engine, certs, min_version=version, max_version=version)
    cli = client(cli_engine, certs)
    assert not cli.handshake_done and not srv.handshake_done
    handshake(cli, srv)
    assert cli.handshake_done and srv.handshake_done
    assert cli.handshake() and srv.handshake()  # idempotent once done
    assert cli.outgoing() == b"" and srv.outgoing() == b""
    sf, cf = srv.facts(), cli.facts()
    assert sf.engine == srv_engine and cf.engine == cli_engine
    assert sf.version == cf.version == version
    assert sf.cipher == cf.cipher  # every engine names suites as OpenSSL does
    assert ("-" not in sf.cipher) == (version == "TLSv1.3")
    assert sf.cipher_bits == cf.cipher_bits >= 128
    assert sf.sni == cf.sni == "localhost"
    assert sf.alpn is None and cf.alpn is None
    assert not sf.resumed and not cf.resumed
    # No client certificate was asked for.
    assert not sf.peer_cert_present and sf.peer is None and not sf.peer_verified
    assert sf.verify_error == VERIFY_ERROR_NO_PEER_CERT
    assert sf.local is not None and "localhost" in sf.local.san_dns
    # The client verified the server against the CA.
    assert cf.peer_cert_present and cf.peer_verified and cf.verify_error is None
    assert cf.peer is not None and cf.peer.fingerprint_sha256 == sf.local.fingerprint_sha256
    assert cf.local is None
    # Facts survive their own serialization.
    assert type(sf).from_dict(sf.to_dict()) == sf


@pair_params
@each_version
def test_one_mebibyte_each_way(cli_engine: str, srv_engine: str, certs: Path,
                               version: str) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs, min_version=version, max_version=version)
    rng = random.Random(f"{cli_engine}{srv_engine}{version}")
    up, down = rng.randbytes(1 << 20), rng.randbytes(1 << 20)
    assert transfer(cli, srv, up, 16 * 1024 + 7) == up
    assert transfer(srv, cli, down, 100_000) == down
    assert not cli.peer_closed and not srv.peer_closed


@pair_params
def test_alpn(cli_engine: str, srv_engine: str, certs: Path) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs, cli_kw={"alpn": ["h2", "sip"]},
                         alpn=("sip", "h2"))
    # The server's preference wins.
    assert srv.facts().alpn == cli.facts().alpn == "sip"
    cli, srv = connected(cli_engine, srv_engine, certs, cli_kw={"alpn": ["x-other"]},
                         alpn=("sip",))
    assert srv.facts().alpn is None and cli.facts().alpn is None


@pair_params
def test_no_sni(cli_engine: str, srv_engine: str, certs: Path) -> None:
    # An IP literal is checked against the IP SAN and never sent as SNI (RFC 6066).
    cli, srv = connected(cli_engine, srv_engine, certs, cli_kw={"server_hostname": "127.0.0.1"})
    assert srv.facts().sni is None and cli.facts().sni is None
    assert cli.facts().peer_verified


@pair_params
def test_sni_without_hostname_check(cli_engine: str, srv_engine: str, certs: Path) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs,
                         cli_kw={"server_hostname": None, "sni": "sip.example.org"})
    assert srv.facts().sni == cli.facts().sni == "sip.example.org"
    assert cli.facts().peer_verified  # the chain still is


@pair_params
def test_client_without_verification(cli_engine: str, srv_engine: str, certs: Path) -> None:
    cli, _ = connected(cli_engine, srv_engine, certs,
                       cli_kw={"ca_file": certs / "other-ca.pem", "verify": False})
    facts = cli.facts()
    assert facts.peer_cert_present and facts.peer is not None
    assert not facts.peer_verified and facts.verify_error == VERIFY_ERROR_NOT_VERIFIED


@pair_params
@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_notify(cli_engine: str, srv_engine: str, certs: Path, closer: str) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs)
    a, b = (cli, srv) if closer == "client" else (srv, cli)
    a.write(b"last words")
    a.close_notify()
    pump(a, b)
    assert b.read() == b"last words"
    assert b.peer_closed and not a.peer_closed
    # The other side answers with its own close_notify.
    b.close_notify()
    pump(a, b)
    assert a.read() == b""
    assert a.peer_closed


@pair_params
@pytest.mark.parametrize("receiver", ["client", "server"])
def test_eof_without_close_notify(cli_engine: str, srv_engine: str, certs: Path,
                                  receiver: str) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs)
    a, b = (srv, cli) if receiver == "client" else (cli, srv)
    a.write(b"truncated?")
    pump(a, b)
    b.receive_eof()
    assert b.read() == b"truncated?"
    assert b.peer_closed


@pair_params
def test_untrusted_server_certificate(cli_engine: str, srv_engine: str, certs: Path) -> None:
    srv = server(srv_engine, certs)
    cli = client(cli_engine, certs, ca_file=certs / "other-ca.pem")
    cli_error, srv_error = failed_handshake(cli, srv)
    assert cli_error is not None and cli_error.reason == "verify_failed" and cli_error.detail
    assert not cli.handshake_done
    # The client tells the server why; the server's handshake fails as well.
    assert srv_error is not None and srv_error.reason == "handshake_failed"
    assert not srv.handshake_done


@pair_params
def test_wrong_server_name(cli_engine: str, srv_engine: str, certs: Path) -> None:
    srv = server(srv_engine, certs)
    cli = client(cli_engine, certs, server_hostname="other.example")
    cli_error, _ = failed_handshake(cli, srv)
    assert cli_error is not None and cli_error.reason == "verify_failed"
    assert not cli.handshake_done and not srv.handshake_done


@pair_params
@each_version
@pytest.mark.parametrize("mode", ["on", "optional"])
def test_client_certificate_verified(cli_engine: str, srv_engine: str, certs: Path,
                                     version: str, mode: str) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs, cli_kw={"who": "client"},
                         ca_list=certs / "ca.pem", verify_client=mode,
                         min_version=version, max_version=version)
    sf, cf = srv.facts(), cli.facts()
    assert sf.peer_cert_present and sf.peer_verified and sf.verify_error is None
    assert sf.peer is not None and sf.peer.san_dns == ("client.example.net",)
    assert cf.local is not None and cf.local.fingerprint_sha256 == sf.peer.fingerprint_sha256


@pair_params
def test_optional_without_client_certificate(cli_engine: str, srv_engine: str,
                                             certs: Path) -> None:
    _, srv = connected(cli_engine, srv_engine, certs, ca_list=certs / "ca.pem",
                       verify_client="optional")
    facts = srv.facts()
    assert not facts.peer_cert_present and not facts.peer_verified
    assert facts.verify_error == VERIFY_ERROR_NO_PEER_CERT


@pair_params
@each_version
def test_missing_client_certificate(cli_engine: str, srv_engine: str, certs: Path,
                                    version: str) -> None:
    srv = server(srv_engine, certs, ca_list=certs / "ca.pem", verify_client="on",
                 min_version=version, max_version=version)
    cli = client(cli_engine, certs)
    cli_error, srv_error = failed_handshake(cli, srv)
    assert srv_error is not None and srv_error.reason == "handshake_failed"
    assert not srv.handshake_done
    # TLS 1.3: the client is done before the server notices; TLS 1.2: it hears the alert.
    if version == "TLSv1.2":
        assert cli_error is not None and cli_error.reason == "handshake_failed"


@pair_params
@pytest.mark.parametrize("mode", ["on", "optional"])
def test_untrusted_client_certificate(cli_engine: str, srv_engine: str, certs: Path,
                                      mode: str) -> None:
    srv = server(srv_engine, certs, ca_list=certs / "ca.pem", verify_client=mode)
    cli = client(cli_engine, certs, who="rogue")
    _, srv_error = failed_handshake(cli, srv)
    assert srv_error is not None and srv_error.reason == "verify_failed" and srv_error.detail
    assert not srv.handshake_done


@pytest.mark.parametrize(("cli_engine", "srv_engine"), pairs_for("optional_no_ca"))
@each_version
@pytest.mark.parametrize("who", ["rogue", "client", None])
def test_optional_no_ca(cli_engine: str, srv_engine: str, certs: Path, version: str,
                        who: str | None) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs, cli_kw={"who": who},
                         ca_list=certs / "ca.pem", verify_client="optional_no_ca",
                         min_version=version, max_version=version)
    facts = srv.facts()
    if who is None:
        assert not facts.peer_cert_present and facts.verify_error == VERIFY_ERROR_NO_PEER_CERT
    elif who == "rogue":
        # Accepted, and reported for what it is.
        assert facts.peer_cert_present and not facts.peer_verified
        assert facts.verify_error and facts.verify_error != VERIFY_ERROR_NO_PEER_CERT
        assert facts.peer is not None and facts.peer.san_dns == ("rogue.example.net",)
    else:
        assert facts.peer_cert_present and facts.peer_verified and facts.verify_error is None
    cli.write(b"still talking")
    pump(cli, srv)
    assert srv.read() == b"still talking"


def test_openssl_refuses_optional_no_ca(certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"profile 'test'.*optional_no_ca"):
        server_engine_factory("openssl", profile(certs, ca_list=certs / "ca.pem",
                                                 verify_client="optional_no_ca"))


# ---- one engine at a time ---------------------------------------------------------------


@each_server
def test_partial_records(srv_engine: str, certs: Path) -> None:
    cli, srv = connected(srv_engine, srv_engine, certs)
    cli.write(b"hello over tls")
    wire = cli.outgoing()
    got = b""
    for i in range(len(wire)):
        srv.receive(wire[i : i + 1])
        got += srv.read()
    assert got == b"hello over tls"


@each_server
def test_buffered_records_read_in_one_go(srv_engine: str, certs: Path) -> None:
    cli, srv = connected(srv_engine, srv_engine, certs)
    data = bytes(range(256)) * 1024
    for i in range(0, len(data), 4000):
        cli.write(data[i : i + 4000])
    pump(cli, srv)
    assert srv.read() == data


@each_server
@pytest.mark.parametrize("sent", [0, 10], ids=["nothing", "partial-client-hello"])
def test_eof_in_handshake(srv_engine: str, certs: Path, sent: int) -> None:
    srv = server(srv_engine, certs)
    cli = client(srv_engine, certs)
    cli.handshake()
    srv.receive(cli.outgoing()[:sent])
    srv.receive_eof()
    with pytest.raises(TlsError) as info:
        srv.handshake()
    assert info.value.reason == "eof_in_handshake"
    assert not srv.handshake_done


@each_server
@pytest.mark.parametrize(
    "garbage",
    [
        b"OPTIONS sip:kamailio SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.1\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x00\x00\x00\x00\x00",
        bytes(range(256)),
    ],
    ids=["plaintext-sip", "bad-client-hello", "binary"],
)
def test_garbage_in_handshake(srv_engine: str, certs: Path, garbage: bytes) -> None:
    srv = server(srv_engine, certs)
    srv.receive(garbage)
    with pytest.raises(TlsError) as info:
        srv.handshake()
    assert info.value.reason == "handshake_failed"
    assert info.value.detail
    assert str(info.value).startswith("handshake_failed: ")
    assert not srv.handshake_done


@each_server
def test_garbage_after_handshake(srv_engine: str, certs: Path) -> None:
    _, srv = connected(srv_engine, srv_engine, certs)
    srv.receive(b"\x17\x03\x03\x00\x20" + bytes(32))  # an application record nobody sealed
    with pytest.raises(TlsError) as info:
        srv.read()
    assert info.value.reason == "tls_error"


@each_server
def test_facts_before_handshake(srv_engine: str, certs: Path) -> None:
    with pytest.raises(ValueError, match="not completed"):
        server(srv_engine, certs).facts()
    with pytest.raises(ValueError, match="not completed"):
        client(srv_engine, certs).facts()


@pair_params
def test_tls12_cipher_string(cli_engine: str, srv_engine: str, certs: Path) -> None:
    cli, srv = connected(cli_engine, srv_engine, certs, max_version="TLSv1.2",
                         ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    assert srv.facts().cipher == cli.facts().cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert srv.facts().cipher_bits == 128
    # Like OpenSSL's, the string leaves TLS 1.3 alone when TLS 1.2 is off.
    _, srv = connected(cli_engine, srv_engine, certs, min_version="TLSv1.3",
                       ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert srv.facts().cipher == "TLS_AES_256_GCM_SHA384"
    # With both on, GnuTLS has one cipher list for both versions (see engines/gnutls/priority.py).
    _, srv = connected(cli_engine, srv_engine, certs, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert srv.facts().version == "TLSv1.3"
    expected = "TLS_AES_128_GCM_SHA256" if srv_engine == "gnutls" else "TLS_AES_256_GCM_SHA384"
    assert srv.facts().cipher == expected


# ---- the registry -----------------------------------------------------------------------


def test_available_names_every_engine() -> None:
    assert tuple(AVAILABLE) == ENGINES == ("openssl", "pyopenssl", "gnutls")
    assert AVAILABLE["openssl"] is None
    assert all(r is None or (isinstance(r, str) and r) for r in AVAILABLE.values())


@each_server
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"private_key": "spare.key"}, r"certificate .* and key .* cannot be used"),
        ({"certificate": "missing.pem"}, r"missing\.pem"),
        ({"ca_list": "server.key", "verify_client": "on"}, r"CA list .* unusable"),
    ],
    ids=["key-mismatch", "missing-certificate", "bad-ca-list"],
)
def test_bad_profile_files(srv_engine: str, certs: Path, change: dict[str, str],
                           message: str) -> None:
    kw: dict[str, Any] = {
        "name": "broken",
        "certificate": certs / "server.pem",
        "private_key": certs / "server.key",
    }
    kw.update({k: certs / v if k != "verify_client" else v for k, v in change.items()})
    with pytest.raises(ConfigError, match=f"profile 'broken'.*{message}"):
        server_engine_factory(srv_engine, ServerProfile(**kw))


def test_unknown_engine(certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"profile 'test'.*unknown TLS engine 'boringssl'"):
        server_engine_factory("boringssl", profile(certs))


def test_unavailable_engine_names_the_reason(certs: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_reason", lambda name: "libfoo.so.1 not found")
    with pytest.raises(ConfigError, match=r"profile 'test'.*gnutls is unavailable: libfoo"):
        server_engine_factory("gnutls", profile(certs))
    with pytest.raises(ConfigError, match="unavailable: libfoo"):
        client_engine("gnutls", ca_file=None)


def test_missing_libgnutls_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlsbridge.daemon.engines.gnutls import binding

    def no_library(*_: Any, **__: Any) -> Any:
        raise OSError("libgnutls.so.30: cannot open shared object file")

    monkeypatch.setattr(binding.ctypes, "CDLL", no_library)
    lib, reason = binding.load()
    assert lib is None and reason is not None and "libgnutls.so.30 cannot be loaded" in reason


def test_missing_pyopenssl_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tlsbridge.daemon import engines

    monkeypatch.setitem(sys.modules, "OpenSSL", None)  # makes `import OpenSSL` fail
    monkeypatch.delitem(sys.modules, "tlsbridge.daemon.engines.pyopenssl", raising=False)
    monkeypatch.delattr(engines, "pyopenssl", raising=False)
    reason = registry.available()["pyopenssl"]
    assert reason is not None and reason.startswith("pyOpenSSL cannot be imported")


@pytest.mark.needs_engine("gnutls")
def test_gnutls_refuses_a_cipher_string_it_cannot_express(certs: Path) -> None:
    # Priorities enable kx x cipher x MAC: these two suites would bring in two more.
    with pytest.raises(ConfigError, match=r"would also enable .*ECDHE-RSA-AES256-GCM-SHA384"):
        server_engine_factory("gnutls", profile(
            certs, ciphers="ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"))


@pytest.mark.needs_engine("gnutls")
def test_gnutls_callback_exception_becomes_tls_error(certs: Path) -> None:
    class Boom(bytearray):
        def __getitem__(self, key: Any) -> Any:
            raise RuntimeError("boom")

    srv = server("gnutls", certs)
    srv._st.inbuf = Boom(b"\x16\x03\x01\x00\x05hello")  # type: ignore[attr-defined]
    with pytest.raises(TlsError) as info:
        srv.handshake()
    assert info.value.reason == "handshake_failed"
    assert "pull callback failed: RuntimeError('boom')" in info.value.detail


@pytest.mark.needs_engine("gnutls")
def test_gnutls_free(certs: Path) -> None:
    srv = server("gnutls", certs)
    srv.free()  # type: ignore[attr-defined]
    srv.free()  # type: ignore[attr-defined]
    with pytest.raises(TlsError, match="freed"):
        srv.handshake()


def test_factory_builds_the_context_once(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlsbridge.daemon.engines import openssl

    calls = []
    real = openssl.server_context
    monkeypatch.setattr(openssl, "server_context", lambda p: calls.append(p) or real(p))
    factory = server_engine_factory("openssl", profile(certs))
    engines = [factory() for _ in range(3)]
    assert len(calls) == 1 and len({id(e) for e in engines}) == 3


# ---- real tools over a real socket -------------------------------------------------------


def _serve_one(sock: socket.socket, engine: TlsEngine, result: dict[str, Any]) -> None:
    """Drive `engine` over the first connection: read one line, answer it, close."""
    try:
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(10)

            def flush() -> None:
                data = engine.outgoing()
                if data:
                    conn.sendall(data)

            def feed() -> None:
                data = conn.recv(65536)
                if data:
                    engine.receive(data)
                else:
                    engine.receive_eof()

            while not engine.handshake():
                flush()
                feed()
            flush()
            got = engine.read()
            while b"\n" not in got and not engine.peer_closed:
                feed()
                got += engine.read()
                flush()
            result["facts"] = engine.facts()
            result["got"] = got
            engine.write(b"PONG " + got)
            engine.close_notify()
            flush()
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
    except BaseException as exc:  # reported by the test thread
        result["error"] = exc


@pytest.fixture
def served() -> Iterator[Any]:
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(engine: TlsEngine) -> tuple[int, dict[str, Any]]:
        sock = socket.create_server(("127.0.0.1", 0))
        sock.settimeout(10)
        socks.append(sock)
        result: dict[str, Any] = {}
        t = threading.Thread(target=_serve_one, args=(sock, engine, result), daemon=True)
        t.start()
        threads.append(t)
        return sock.getsockname()[1], result

    yield start
    for s in socks:
        s.close()
    for t in threads:
        t.join(timeout=10)


def _tool_command(tool: str, port: int, certs: Path, version: str, mtls: bool) -> list[str]:
    if tool == "openssl":
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
               "-verify_hostname", "localhost", "-CAfile", str(certs / "ca.pem"),
               "-verify_return_error", "-quiet", "-tls1_3" if version == "TLSv1.3" else "-tls1_2"]
        if mtls:
            cmd += ["-cert", str(certs / "client.pem"), "-key", str(certs / "client.key")]
        return cmd
    cmd = ["gnutls-cli", "-p", str(port), "--x509cafile", str(certs / "ca.pem"),
           "--sni-hostname", "localhost", "--verify-hostname", "localhost",
           f"--priority=NORMAL:-VERS-ALL:+VERS-TLS{version[4:]}", "127.0.0.1"]
    if mtls:
        cmd += ["--x509certfile", str(certs / "client.pem"),
                "--x509keyfile", str(certs / "client.key")]
    return cmd


TOOLS = [
    pytest.param(tool, id=tool, marks=pytest.mark.needs_program(binary, pkg))
    for tool, binary, pkg in (("openssl", "openssl", "openssl"),
                              ("gnutls", "gnutls-cli", "gnutls-bin"))
]


@pytest.mark.parametrize("tool", TOOLS)
@each_server
@each_version
@pytest.mark.parametrize("mtls", [False, True], ids=["anonymous", "mtls"])
def test_real_client_tool(tool: str, srv_engine: str, certs: Path, version: str, served: Any,
                          mtls: bool) -> None:
    kw: dict[str, Any] = {"min_version": version, "max_version": version}
    if mtls:
        kw.update(ca_list=certs / "ca.pem", verify_client="on")
    port, result = served(server(srv_engine, certs, **kw))
    proc = subprocess.run(_tool_command(tool, port, certs, version, mtls), input=b"PING\n",
                          capture_output=True, timeout=20, check=False)
    assert "error" not in result, f"{result.get('error')!r}\n{proc.stderr.decode()}"
    assert b"PONG PING\n" in proc.stdout, proc.stderr.decode()
    facts = result["facts"]
    assert facts.version == version and facts.sni == "localhost" and facts.cipher
    assert facts.peer_cert_present is mtls and facts.peer_verified is mtls


@pair_params
def test_eof_after_data_already_read(cli_engine: str, srv_engine: str, certs: Path) -> None:
    """The relay reads data as it comes; the FIN arrives in a later call."""
    cli, srv = connected(cli_engine, srv_engine, certs)
    cli.write(b"half a message")
    pump(cli, srv)
    assert srv.read() == b"half a message"
    assert srv.read() == b""
    srv.receive_eof()
    assert srv.read() == b""
    assert srv.peer_closed


@pair_params
def test_fin_without_close_notify_leaves_the_other_half_open(cli_engine: str, srv_engine: str,
                                                             certs: Path) -> None:
    """A TCP FIN without close_notify ends what the peer sends, not what it is sent: the
    replies still due to it (Kamailio's, in the relay) must reach it."""
    cli, srv = connected(cli_engine, srv_engine, certs)
    cli.write(b"request")
    pump(cli, srv)
    assert srv.read() == b"request"
    srv.receive_eof()  # the client's FIN, no close_notify before it
    assert srv.read() == b""
    assert srv.peer_closed
    srv.write(b"the reply")
    cli.receive(srv.outgoing())
    assert cli.read() == b"the reply"
