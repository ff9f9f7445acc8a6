"""Profile keys on every engine, over real TLS in memory: SNI profiles (exact, wildcard,
default, strict), CRLs, hashed CA directories, TLS 1.3 suites and key exchange groups, for
server profiles and client profiles (`[client.NAME]`, built as the outbound side builds them).

Clients that offer only some suites or groups are pyOpenSSL or GnuTLS ones (the stdlib ssl
module cannot restrict TLS 1.3), each where it runs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.pki import write_crl
from tests.support.requirements import program, require_engine
from tests.unit.test_engines import (
    EACH,
    PAIRS,
    VERSIONS,
    failed_handshake,
    handshake,
    pump,
)
from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines.base import TlsEngine, TlsError
from tlsbridge.daemon.engines.registry import (
    client_engine,
    client_engine_factory,
    listener_engine_factory,
    server_engine_factory,
)
from tlsbridge.daemon.sni import refusal

pair_params = pytest.mark.parametrize(("cli_engine", "srv_engine"), PAIRS)
each_server = pytest.mark.parametrize("srv_engine", EACH)
each_version = pytest.mark.parametrize("version", VERSIONS)
# The engines that can switch verification per SNI profile.
SWITCHING = [p for p in EACH if p.values[0] != "openssl"]
each_switching = pytest.mark.parametrize("srv_engine", SWITCHING)
# Pairs whose server engine can restrict TLS 1.3 suites.
TLS13_PAIRS = [p for p in PAIRS if p.values[1] != "openssl"]
# Clients that can offer a chosen set of TLS 1.3 suites or groups.
each_restricted_client = pytest.mark.parametrize("cli_kind", SWITCHING)


# ---- certificates -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("profiles")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    (d / "both-ca.pem").write_bytes(ca.cert_pem.bytes() + other.cert_pem.bytes())

    def issue(issuer: trustme.CA, name: str, *identities: str) -> trustme.LeafCert:
        leaf = issuer.issue_cert(*identities)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
        return leaf

    issue(ca, "default", "localhost", "127.0.0.1")
    issue(ca, "a", "a.example.test")
    issue(ca, "b", "*.b.example.test")
    issue(ca, "client", "client.example.net")
    revoked = issue(ca, "revoked", "revoked.example.net")
    issue(other, "rogue", "rogue.example.net")
    write_crl(ca, revoked, d / "crl.pem")
    return d


@pytest.fixture(scope="module")
def hashed_dir(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A c_rehash'ed directory holding the CA (not the other CA)."""
    program("openssl")
    d = tmp_path_factory.mktemp("capath")
    shutil.copy(certs / "ca.pem", d / "ca.pem")
    subprocess.run(["openssl", "rehash", str(d)], check=True, capture_output=True)
    assert any(p.name.endswith(".0") for p in d.iterdir())
    return d


def profile(certs: Path, name: str = "default", cert: str = "default", **kw: Any) -> ServerProfile:
    return ServerProfile(name=name, certificate=certs / f"{cert}.pem",
                         private_key=certs / f"{cert}.key", **kw)


def site_a(certs: Path, **kw: Any) -> ServerProfile:
    return profile(certs, "site_a", "a", server_names=("a.example.test",), **kw)


def site_b(certs: Path, **kw: Any) -> ServerProfile:
    return profile(certs, "site_b", "b", server_names=("*.b.example.test",), **kw)


def client(engine: str, certs: Path, *, sni: str | None, who: str | None = None,
           **kw: Any) -> TlsEngine:
    """A client that checks the chain only, so any profile's certificate passes."""
    if who is not None:
        kw.update(cert=certs / f"{who}.pem", key=certs / f"{who}.key")
    return client_engine(engine, ca_file=certs / "ca.pem", server_hostname=None,
                         sni=sni or "", **kw)


def restricted_client(kind: str, certs: Path, *, tls13: str | None = None,
                      groups: str | None = None, version: str | None = None,
                      host: str = "localhost") -> TlsEngine:
    """A pyOpenSSL or GnuTLS client offering only `tls13` suites or `groups` (OpenSSL names)."""
    where = "test client"
    if kind == "pyopenssl":
        from tlsbridge.daemon.engines import pyopenssl

        ctx = pyopenssl.client_context(ClientProfile(name="test", ca_list=certs / "ca.pem"))
        if tls13:
            ctx.set_tls13_ciphersuites(tls13.encode())
        if groups:
            pyopenssl._groups(where, ctx, groups)
        if version:
            number = pyopenssl._VERSIONS[version]
            ctx.set_min_proto_version(number)
            ctx.set_max_proto_version(number)
        return pyopenssl.PyOpenSSLEngine(ctx, server_side=False, server_hostname=host)
    from tlsbridge.daemon.engines import gnutls
    from tlsbridge.daemon.engines.gnutls import binding, priority

    prio = ["NORMAL", priority.versions(version or "TLSv1.2", version or "TLSv1.3")]
    if tls13:
        ciphers = [s[3] for s in priority.tls13_suites(where, tls13)]
        lib = binding.need_lib()
        prio += ["-CIPHER-ALL", *(f"+{binding.name_of(lib, 'gnutls_cipher_get_name', c)}"
                                  for c in ciphers)]
    if groups:
        prio.append(priority.group_priority(where, groups))
    ctx = gnutls.GnuTLSContext(server_side=False, priority=":".join(prio), verify="on")
    ctx.load_trust(certs / "ca.pem")
    return gnutls.GnuTLSEngine(ctx, server_hostname=host)


def served_name(cli: TlsEngine) -> str:
    peer = cli.facts().peer
    assert peer is not None
    return peer.san_dns[0]


def sni_server(engine: str, certs: Path, *, strict: bool = False, version: str | None = None,
               default_kw: dict[str, Any] | None = None, **a_kw: Any) -> TlsEngine:
    """A listener: the default profile, site_a (with `a_kw`) and site_b; `version` for all."""
    both: dict[str, Any] = {"min_version": version, "max_version": version} if version else {}
    return listener_engine_factory(
        engine, profile(certs, **both, **(default_kw or {})),
        [site_a(certs, **both, **a_kw), site_b(certs, **both)], strict_sni=strict)()


def assert_refused_name(cli_error: TlsError | None) -> None:
    assert cli_error is not None and cli_error.reason == "handshake_failed"
    assert "unrecognized" in cli_error.detail.lower().replace("_", " ")


# ---- SNI ----------------------------------------------------------------------------------


@pair_params
@pytest.mark.parametrize(("sni", "expected"), [
    ("a.example.test", "a.example.test"),
    ("A.Example.TEST", "a.example.test"),  # case does not matter
    ("x.b.example.test", "*.b.example.test"),  # a wildcard covers one label...
    ("y.x.b.example.test", "localhost"),  # ...not two
    ("b.example.test", "localhost"),  # ...nor none
    ("localhost", "localhost"),
    ("unknown.example.test", "localhost"),
    (None, "localhost"),
])
def test_sni_picks_the_profile(cli_engine: str, srv_engine: str, certs: Path, sni: str | None,
                               expected: str) -> None:
    srv = sni_server(srv_engine, certs)
    cli = client(cli_engine, certs, sni=sni)
    handshake(cli, srv)
    assert served_name(cli) == expected
    sf, cf = srv.facts(), cli.facts()
    assert sf.sni == sni
    # The facts name the certificate actually served.
    assert sf.local is not None and cf.peer is not None
    assert sf.local.fingerprint_sha256 == cf.peer.fingerprint_sha256
    cli.write(b"OPTIONS sip:x SIP/2.0\r\n")
    pump(cli, srv)
    assert srv.read() == b"OPTIONS sip:x SIP/2.0\r\n"


@each_server
@each_version
@pytest.mark.parametrize("sni", ["unknown.example.test", "b.example.test", None])
def test_strict_sni_refuses(srv_engine: str, certs: Path, version: str, sni: str | None) -> None:
    srv = sni_server(srv_engine, certs, strict=True, version=version)
    cli_error, srv_error = failed_handshake(client("openssl", certs, sni=sni), srv)
    assert srv_error is not None and srv_error.reason == "sni_refused"
    assert srv_error.detail == refusal(sni)  # every engine says it the same way
    assert_refused_name(cli_error)
    assert not srv.handshake_done


@pair_params
def test_strict_sni_serves_known_names(cli_engine: str, srv_engine: str, certs: Path) -> None:
    for sni, expected in (("a.example.test", "a.example.test"),
                          ("z.b.example.test", "*.b.example.test")):
        srv = sni_server(srv_engine, certs, strict=True)
        cli = client(cli_engine, certs, sni=sni)
        handshake(cli, srv)
        assert served_name(cli) == expected == srv.facts().local.san_dns[0]  # type: ignore[union-attr]


@each_server
def test_strict_sni_with_no_profiles_refuses_everything(srv_engine: str, certs: Path) -> None:
    srv = listener_engine_factory(srv_engine, profile(certs), [], strict_sni=True)()
    _, srv_error = failed_handshake(client("openssl", certs, sni="localhost"), srv)
    assert srv_error is not None and srv_error.reason == "sni_refused"


@each_server
def test_sni_profile_tls12_ciphers(srv_engine: str, certs: Path) -> None:
    # TLS 1.2 suites are chosen after the switch: each profile's own apply.
    for sni, expected in (("a.example.test", "ECDHE-ECDSA-AES256-GCM-SHA384"),
                          ("localhost", "ECDHE-ECDSA-AES128-GCM-SHA256")):
        srv = sni_server(srv_engine, certs, version="TLSv1.2",
                         default_kw={"ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256"},
                         ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
        handshake(client("openssl", certs, sni=sni), srv)
        assert srv.facts().cipher == expected


@each_switching
@each_version
def test_sni_profile_verifies_clients(srv_engine: str, certs: Path, version: str) -> None:
    """The default asks for nothing; site_a requires a client certificate, checked against
    its own CA list and CRL."""
    def srv() -> TlsEngine:
        return sni_server(srv_engine, certs, version=version, verify_client="on",
                          ca_list=certs / "ca.pem", crl=certs / "crl.pem")

    # The default profile: no certificate asked for.
    s = srv()
    handshake(client("openssl", certs, sni="localhost", who="client"), s)
    assert not s.facts().peer_cert_present
    # site_a: a good certificate is verified and reported.
    s = srv()
    handshake(client("openssl", certs, sni="a.example.test", who="client"), s)
    facts = s.facts()
    assert facts.peer_verified and facts.peer is not None
    assert facts.peer.san_dns == ("client.example.net",)
    # site_a: none, a stranger's and a revoked one are refused.
    _, err = failed_handshake(client("openssl", certs, sni="a.example.test"), s := srv())
    assert err is not None and err.reason == "handshake_failed" and not s.handshake_done
    for who, words in (("rogue", ("issuer", "local issuer")), ("revoked", ("revoked",))):
        _, err = failed_handshake(client("openssl", certs, sni="a.example.test", who=who),
                                  s := srv())
        assert err is not None and err.reason == "verify_failed", err
        assert any(w in err.detail.lower() for w in words), err.detail


@each_switching
def test_sni_profile_without_verification(srv_engine: str, certs: Path) -> None:
    """The other way round: the default requires a certificate, site_a asks for none."""
    ca_kw = {"verify_client": "on", "ca_list": certs / "ca.pem"}
    srv = sni_server(srv_engine, certs, default_kw=ca_kw)
    cli = client("openssl", certs, sni="a.example.test")
    handshake(cli, srv)
    facts = srv.facts()
    assert not facts.peer_cert_present and not facts.peer_verified
    _, err = failed_handshake(client("openssl", certs, sni="localhost"),
                              sni_server(srv_engine, certs, default_kw=ca_kw))
    assert err is not None and err.reason == "handshake_failed"


@each_switching
def test_sni_profile_optional_no_ca(srv_engine: str, certs: Path) -> None:
    srv = sni_server(srv_engine, certs, verify_client="optional_no_ca", ca_list=certs / "ca.pem")
    handshake(client("openssl", certs, sni="a.example.test", who="rogue"), srv)
    facts = srv.facts()
    assert facts.peer_cert_present and not facts.peer_verified and facts.verify_error


@pytest.mark.parametrize(("engine", "key", "value"), [
    ("openssl", "verify_client", "on"),
    ("openssl", "min_version", "TLSv1.3"),  # it would serve TLS 1.2 (the default's) all the same
    ("openssl", "groups", "secp384r1"),
    ("pyopenssl", "min_version", "TLSv1.3"),
    ("pyopenssl", "groups", "X25519"),
    ("pyopenssl", "tls13_ciphersuites", "TLS_AES_128_GCM_SHA256"),
    ("gnutls", "max_version", "TLSv1.2"),
    ("gnutls", "alpn", ("sip",)),
])
def test_sni_profiles_must_agree_on_what_is_settled_first(certs: Path, engine: str, key: str,
                                                          value: Any) -> None:
    require_engine(engine)
    kw: dict[str, Any] = {key: value}
    if key == "verify_client":
        kw["ca_list"] = certs / "ca.pem"
    with pytest.raises(ConfigError, match=rf"profile 'site_a': engine {engine} .*'{key}'.*"
                                          r"default profile 'default'"):
        listener_engine_factory(engine, profile(certs), [site_a(certs, **kw)])


# ---- CRL and CA directories ---------------------------------------------------------------


@each_server
@each_version
@pytest.mark.parametrize("mode", ["on", "optional"])
def test_crl_refuses_a_revoked_client(srv_engine: str, certs: Path, version: str,
                                      mode: str) -> None:
    def srv() -> TlsEngine:
        return server_engine_factory(srv_engine, profile(
            certs, verify_client=mode, ca_list=certs / "ca.pem", crl=certs / "crl.pem",
            min_version=version, max_version=version))()

    _, err = failed_handshake(client("openssl", certs, sni="localhost", who="revoked"), s := srv())
    assert err is not None and err.reason == "verify_failed" and "revoked" in err.detail.lower()
    assert not s.handshake_done
    s = srv()
    handshake(client("openssl", certs, sni="localhost", who="client"), s)
    assert s.facts().peer_verified


@each_server
def test_crl_needs_one_from_the_clients_issuer(srv_engine: str, certs: Path) -> None:
    """OpenSSL's CRL check (the leaf's): a CA trusted without a CRL in `crl` lets no client
    in. The gnutls engine does the same, though GnuTLS alone would not."""
    srv = server_engine_factory(srv_engine, profile(
        certs, verify_client="on", ca_list=certs / "both-ca.pem", crl=certs / "crl.pem"))()
    _, err = failed_handshake(client("openssl", certs, sni="localhost", who="rogue"), srv)
    assert err is not None and err.reason == "verify_failed"
    assert "unable to get certificate crl" in err.detail.lower()


@each_switching
def test_crl_with_optional_no_ca_reports_the_revocation(srv_engine: str, certs: Path) -> None:
    srv = server_engine_factory(srv_engine, profile(
        certs, verify_client="optional_no_ca", ca_list=certs / "ca.pem", crl=certs / "crl.pem"))()
    handshake(client("openssl", certs, sni="localhost", who="revoked"), srv)
    facts = srv.facts()
    assert facts.peer_cert_present and not facts.peer_verified
    assert facts.verify_error is not None and "revoked" in facts.verify_error.lower()


@each_server
def test_a_crl_file_without_crls_is_refused(srv_engine: str, certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"profile 'default': CRL .*ca\.pem unusable"):
        server_engine_factory(srv_engine, profile(
            certs, verify_client="on", ca_list=certs / "ca.pem", crl=certs / "ca.pem"))


@each_server
@pytest.mark.parametrize("mode", ["on", "optional"])
def test_ca_path(srv_engine: str, certs: Path, hashed_dir: Path, mode: str) -> None:
    def srv() -> TlsEngine:
        return server_engine_factory(srv_engine, profile(
            certs, verify_client=mode, ca_path=hashed_dir))()

    s = srv()
    handshake(client("openssl", certs, sni="localhost", who="client"), s)
    facts = s.facts()
    assert facts.peer_verified and facts.peer is not None
    assert facts.peer.san_dns == ("client.example.net",)
    _, err = failed_handshake(client("openssl", certs, sni="localhost", who="rogue"), s := srv())
    assert err is not None and err.reason == "verify_failed"


# ---- TLS 1.3 suites -------------------------------------------------------------------------

# One setting every engine that restricts TLS 1.3 takes: with TLS 1.2 on, GnuTLS wants the
# TLS 1.2 suites to use the very same ciphers (engines/gnutls/priority.py).
CHACHA = {"tls13_ciphersuites": "TLS_CHACHA20_POLY1305_SHA256",
          "ciphers": "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"}
# What CHACHA gets with our ECDSA certificate, per protocol version
CHACHA_NEGOTIATED = {"TLSv1.3": "TLS_CHACHA20_POLY1305_SHA256",
                     "TLSv1.2": "ECDHE-ECDSA-CHACHA20-POLY1305"}


@pytest.mark.parametrize(("cli_engine", "srv_engine"), TLS13_PAIRS)
@each_version
def test_tls13_ciphersuites(cli_engine: str, srv_engine: str, certs: Path, version: str) -> None:
    srv = server_engine_factory(srv_engine, profile(certs, **CHACHA, max_version=version))()
    cli = client(cli_engine, certs, sni="localhost")
    handshake(cli, srv)
    assert srv.facts().cipher == cli.facts().cipher == CHACHA_NEGOTIATED[version]


@each_switching
@each_restricted_client
def test_tls13_ciphersuites_refuse_other_suites(srv_engine: str, cli_kind: str,
                                                certs: Path) -> None:
    def srv() -> TlsEngine:
        return server_engine_factory(srv_engine, profile(
            certs, min_version="TLSv1.3", tls13_ciphersuites="TLS_AES_256_GCM_SHA384"))()

    s = srv()
    handshake(restricted_client(cli_kind, certs, tls13="TLS_AES_256_GCM_SHA384"), s)
    assert s.facts().cipher == "TLS_AES_256_GCM_SHA384"
    cli = restricted_client(cli_kind, certs, tls13="TLS_AES_128_GCM_SHA256")
    _, err = failed_handshake(cli, s := srv())
    assert err is not None and err.reason == "handshake_failed" and not s.handshake_done


@each_switching
@pytest.mark.parametrize("suites", ["TLS_AES_256_GCM_SHA384:TLS_BOGUS_SHA256", "TLS_FOO",
                                    "?TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256:"])
def test_unknown_tls13_suite_is_refused(srv_engine: str, certs: Path, suites: str) -> None:
    with pytest.raises(ConfigError, match=r"profile 'default': 'tls13_ciphersuites'"):
        server_engine_factory(srv_engine, profile(certs, min_version="TLSv1.3",
                                                  tls13_ciphersuites=suites))


def test_openssl_refuses_tls13_ciphersuites(certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"profile 'default'.*cannot restrict TLS 1.3"):
        server_engine_factory(
            "openssl", profile(certs, tls13_ciphersuites="TLS_AES_128_GCM_SHA256"))


@pytest.mark.needs_engine("gnutls")
def test_gnutls_tls13_ciphersuites_and_tls12_share_one_cipher_list(certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"'tls13_ciphersuites' alone would restrict TLS 1.2"):
        server_engine_factory("gnutls", profile(certs, tls13_ciphersuites="TLS_AES_128_GCM_SHA256"))
    with pytest.raises(ConfigError, match=r"would also enable TLS 1.3 TLS_AES_128_GCM_SHA256"):
        server_engine_factory("gnutls", profile(
            certs, tls13_ciphersuites="TLS_AES_256_GCM_SHA384",
            ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"))


# ---- groups -------------------------------------------------------------------------------


@each_server
@each_version
def test_groups_allow_the_listed_group(srv_engine: str, certs: Path, version: str) -> None:
    # prime256v1: the one spelling every engine's group setting takes.
    srv = server_engine_factory(srv_engine, profile(certs, groups="prime256v1",
                                                    min_version=version, max_version=version))()
    handshake(client("openssl", certs, sni="localhost"), srv)
    assert srv.facts().version == version


@each_server
@each_restricted_client
@each_version
def test_groups_refuse_a_client_without_them(srv_engine: str, cli_kind: str, certs: Path,
                                             version: str) -> None:
    def srv() -> TlsEngine:
        return server_engine_factory(srv_engine, profile(certs, groups="prime256v1"))()

    s = srv()
    handshake(restricted_client(cli_kind, certs, groups="P-256", version=version), s)
    assert s.facts().version == version
    # The ECDSA certificate leaves TLS 1.2 no key exchange without a common group either.
    _, err = failed_handshake(restricted_client(cli_kind, certs, groups="X25519", version=version),
                              s := srv())
    assert err is not None and err.reason == "handshake_failed" and not s.handshake_done


@each_switching
@each_restricted_client
def test_several_groups(srv_engine: str, cli_kind: str, certs: Path) -> None:
    for offered, ok in (("secp384r1", True), ("X25519", True), ("P-256", False)):
        srv = server_engine_factory(srv_engine, profile(certs, groups="X25519:secp384r1"))()
        cli = restricted_client(cli_kind, certs, groups=offered)
        if ok:
            handshake(cli, srv)
        else:
            _, err = failed_handshake(cli, srv)
            assert err is not None and not srv.handshake_done


@pytest.mark.needs_engine("gnutls")
@each_restricted_client
def test_gnutls_groups_follow_the_sni_profile(cli_kind: str, certs: Path) -> None:
    def srv() -> TlsEngine:
        return sni_server("gnutls", certs, default_kw={"groups": "X25519"}, groups="secp384r1")

    cli = restricted_client(cli_kind, certs, groups="secp384r1", host="a.example.test")
    handshake(cli, s := srv())
    assert s.facts().local.san_dns == ("a.example.test",)  # type: ignore[union-attr]
    # The default profile (SNI localhost) has X25519 only.
    _, err = failed_handshake(restricted_client(cli_kind, certs, groups="secp384r1"), srv())
    assert err is not None


@each_switching
@pytest.mark.parametrize("groups", ["X25519:bogus", "brainpoolP999r1", "?X25519", "X25519::P-256"])
def test_unknown_group_is_refused(srv_engine: str, certs: Path, groups: str) -> None:
    with pytest.raises(ConfigError, match=r"profile 'default': 'groups'"):
        server_engine_factory(srv_engine, profile(certs, groups=groups))



# ---- client profiles ------------------------------------------------------------------------

each_client = pytest.mark.parametrize("cli_engine", EACH)
# Client engines that can restrict the TLS 1.3 suites they offer.
each_switching_client = pytest.mark.parametrize("cli_engine", SWITCHING)


def out(engine: str, certs: Path, host: str = "localhost", **kw: Any) -> TlsEngine:
    """A client engine of profile [client.out], built as the outbound side builds it."""
    if "ca_path" not in kw:
        kw.setdefault("ca_list", certs / "ca.pem")
    return client_engine_factory(ClientProfile(name="out", engine=engine, **kw))(host)


def serving(engine: str, certs: Path, cert: str = "default", **kw: Any) -> TlsEngine:
    return server_engine_factory(engine, profile(certs, cert=cert, **kw))()


@pair_params
@each_version
def test_client_profile_crl_refuses_a_revoked_server(cli_engine: str, srv_engine: str,
                                                     certs: Path, version: str) -> None:
    both = {"min_version": version, "max_version": version}
    srv = serving(srv_engine, certs, "revoked", **both)
    cli = out(cli_engine, certs, "revoked.example.net", crl=certs / "crl.pem")
    err, _ = failed_handshake(cli, srv)
    assert err is not None and err.reason == "verify_failed", err
    assert "revoked" in err.detail.lower() and not cli.handshake_done
    # Without the CRL the same server passes: the CRL made the difference.
    handshake(out(cli_engine, certs, "revoked.example.net"),
              serving(srv_engine, certs, "revoked", **both))
    # A server the CRL does not revoke passes, verified.
    cli = out(cli_engine, certs, crl=certs / "crl.pem")
    handshake(cli, serving(srv_engine, certs, **both))
    facts = cli.facts()
    assert facts.peer_verified and facts.version == version


@each_client
def test_client_profile_crl_needs_one_from_the_servers_issuer(cli_engine: str,
                                                             certs: Path) -> None:
    cli = out(cli_engine, certs, "rogue.example.net", ca_list=certs / "both-ca.pem",
              crl=certs / "crl.pem")
    err, _ = failed_handshake(cli, serving("openssl", certs, "rogue"))
    assert err is not None and err.reason == "verify_failed"
    assert "unable to get certificate crl" in err.detail.lower()


@each_client
def test_client_profile_a_crl_file_without_crls_is_refused(cli_engine: str,
                                                           certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"client profile 'out': CRL .*ca\.pem unusable"):
        out(cli_engine, certs, crl=certs / "ca.pem")


@pair_params
def test_client_profile_ca_path(cli_engine: str, srv_engine: str, certs: Path,
                                hashed_dir: Path) -> None:
    cli = out(cli_engine, certs, ca_path=hashed_dir)
    handshake(cli, serving(srv_engine, certs))
    facts = cli.facts()
    assert facts.peer_verified and facts.peer is not None
    assert facts.peer.san_dns == ("localhost",)
    # The other CA is not in the directory.
    err, _ = failed_handshake(out(cli_engine, certs, "rogue.example.net", ca_path=hashed_dir),
                              serving(srv_engine, certs, "rogue"))
    assert err is not None and err.reason == "verify_failed"


@each_switching_client
@each_server
@each_version
def test_client_profile_tls13_ciphersuites_pick_the_suite(cli_engine: str, srv_engine: str,
                                                          certs: Path, version: str) -> None:
    # The server takes any suite, and would prefer AES: the client offers ChaCha20 only.
    srv = serving(srv_engine, certs, min_version=version, max_version=version)
    cli = out(cli_engine, certs, **CHACHA)
    handshake(cli, srv)
    assert srv.facts().cipher == cli.facts().cipher == CHACHA_NEGOTIATED[version]


@each_switching_client
@each_switching
def test_client_profile_tls13_ciphersuites_refuse_other_suites(cli_engine: str,
                                                               srv_engine: str,
                                                               certs: Path) -> None:
    def srv() -> TlsEngine:
        return serving(srv_engine, certs, min_version="TLSv1.3",
                       tls13_ciphersuites="TLS_AES_256_GCM_SHA384")

    kw: dict[str, Any] = {"min_version": "TLSv1.3"}
    cli = out(cli_engine, certs, tls13_ciphersuites="TLS_AES_256_GCM_SHA384", **kw)
    handshake(cli, srv())
    assert cli.facts().cipher == "TLS_AES_256_GCM_SHA384"
    cli = out(cli_engine, certs, tls13_ciphersuites="TLS_AES_128_GCM_SHA256", **kw)
    err, _ = failed_handshake(cli, s := srv())
    assert err is not None and err.reason == "handshake_failed"
    assert not cli.handshake_done and not s.handshake_done


def test_client_profile_openssl_refuses_tls13_ciphersuites(certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"client profile 'out'.*cannot restrict TLS 1.3"):
        out("openssl", certs, tls13_ciphersuites="TLS_AES_128_GCM_SHA256")


@pytest.mark.needs_engine("gnutls")
def test_client_profile_gnutls_tls13_ciphersuites_need_tls12_ciphers(certs: Path) -> None:
    # The same rule as for a server profile: one cipher list for TLS 1.2 and 1.3.
    with pytest.raises(ConfigError, match=r"client profile 'out'.*'tls13_ciphersuites' alone"):
        out("gnutls", certs, tls13_ciphersuites="TLS_AES_128_GCM_SHA256")


@each_client
@each_server
@each_version
def test_client_profile_groups(cli_engine: str, srv_engine: str, certs: Path,
                               version: str) -> None:
    def srv() -> TlsEngine:
        return serving(srv_engine, certs, groups="prime256v1", min_version=version,
                       max_version=version)

    # prime256v1 and secp384r1: spellings every engine's `groups` takes.
    cli = out(cli_engine, certs, groups="prime256v1")
    handshake(cli, srv())
    assert cli.facts().version == version
    # The ECDSA certificate leaves TLS 1.2 no key exchange without a common group either.
    cli = out(cli_engine, certs, groups="secp384r1")
    err, _ = failed_handshake(cli, s := srv())
    assert err is not None and err.reason == "handshake_failed"
    assert not cli.handshake_done and not s.handshake_done


@each_switching_client
@each_switching
def test_client_profile_several_groups(cli_engine: str, srv_engine: str, certs: Path) -> None:
    for served, ok in (("secp384r1", True), ("X25519", True), ("P-256", False)):
        srv = serving(srv_engine, certs, groups=served)
        cli = out(cli_engine, certs, groups="X25519:secp384r1")
        if ok:
            handshake(cli, srv)
        else:
            err, _ = failed_handshake(cli, srv)
            assert err is not None and not cli.handshake_done


@each_client
@each_version
def test_client_profile_versions_and_ciphers(cli_engine: str, certs: Path, version: str) -> None:
    # The server takes both versions and any suite: the client's profile decides.
    cli = out(cli_engine, certs, min_version=version, max_version=version)
    handshake(cli, serving("openssl", certs))
    assert cli.facts().version == version
    # The server would choose ECDHE-ECDSA-AES256-GCM-SHA384.
    cli = out(cli_engine, certs, max_version="TLSv1.2", ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    handshake(cli, serving("openssl", certs))
    assert cli.facts().cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"
    cli = out(cli_engine, certs, min_version="TLSv1.3")
    err, _ = failed_handshake(cli, serving("openssl", certs, max_version="TLSv1.2"))
    assert err is not None and not cli.handshake_done


@each_client
@pytest.mark.parametrize(("key", "value"), [
    ("groups", "X25519:bogus"),
    ("groups", "brainpoolP999r1"),
    ("tls13_ciphersuites", "TLS_AES_256_GCM_SHA384:TLS_BOGUS_SHA256"),
    ("tls13_ciphersuites", "?TLS_AES_128_GCM_SHA256"),
])
def test_client_profile_unknown_names_are_refused(cli_engine: str, certs: Path, key: str,
                                                  value: str) -> None:
    # openssl: one group only, and no TLS 1.3 suites at all; refused all the same.
    match = (r"client profile 'out'.*cannot restrict TLS 1.3"
             if cli_engine == "openssl" and key == "tls13_ciphersuites"
             else rf"client profile 'out': '{key}'")
    with pytest.raises(ConfigError, match=match):
        out(cli_engine, certs, min_version="TLSv1.3", **{key: value})


@each_client
def test_client_profile_builds_its_context_once(cli_engine: str, certs: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are read when the profile is loaded (start-up, reload), not per connection."""
    factory = client_engine_factory(ClientProfile(
        name="out", engine=cli_engine, ca_list=certs / "ca.pem", crl=certs / "crl.pem"))
    monkeypatch.setattr(Path, "read_bytes", lambda *_: pytest.fail("a file was read"))
    for _ in range(2):
        cli = factory("localhost")
        handshake(cli, serving("openssl", certs))
        assert cli.facts().peer_verified


@each_client
def test_client_profiles_from_the_configuration(cli_engine: str, certs: Path, hashed_dir: Path,
                                                tmp_path: Path) -> None:
    """[client.NAME] keys as the outbound side takes them: every one is honoured or refused."""
    from tlsbridge.daemon.config import load_config
    from tlsbridge.daemon.outbound import Connector

    tls13 = "" if cli_engine == "openssl" else 'tls13_ciphersuites = "TLS_AES_256_GCM_SHA384"'
    path = tmp_path / "tlsbridge.toml"
    path.write_text(f"""
[kamailio]
hairpin = "127.0.0.1:5062"

[profile.default]
certificate = "{certs / 'default.pem'}"
private_key = "{certs / 'default.key'}"

[[listener]]
address = "127.0.0.1:5061"

[client.out]
engine = "{cli_engine}"
ca_path = "{hashed_dir}"
crl = "{certs / 'crl.pem'}"
min_version = "TLSv1.3"
groups = "secp384r1"
{tls13}
""")
    config = load_config(path)
    assert config.clients["out"].groups == "secp384r1"
    cli = Connector.check(config)["out"]("localhost")
    srv = serving("openssl", certs, groups="secp384r1")
    handshake(cli, srv)
    assert cli.facts().version == "TLSv1.3" and cli.facts().peer_verified
    path.write_text(path.read_text().replace('"secp384r1"', '"X25519:nope"'))
    with pytest.raises(ConfigError, match=r"client profile 'out': 'groups'"):
        Connector.check(load_config(path))


def test_pyopenssl_idle_connections_hold_no_record_buffers(certs: Path) -> None:
    """As with Python's ssl module: 26 KiB less per idle connection, measured."""
    from OpenSSL import SSL

    from tlsbridge.daemon.engines import pyopenssl

    for ctx in (pyopenssl.server_context(profile(certs)),
                pyopenssl.client_context(ClientProfile(name="t", ca_list=certs / "ca.pem"))):
        assert ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS  # set_mode(0) answers the mode
