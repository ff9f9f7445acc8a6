"""TLS profiles through the real daemon and Kamailio: SNI, strict SNI, mutual TLS, CRL, reload."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.support.pki import write_crl
from tests.support.procs import free_tcp_udp_port
from tests.support.sip import TlsUA, build_request
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration]


@dataclass
class Lab:
    stack: Stack
    dir: Path
    ports: dict[str, int]
    ca: trustme.CA

    def ua(self, listener: str, sni: str | None = None, client: str | None = None,
           ca: str | None = None) -> TlsUA:
        cert = key = None
        if client:
            cert, key = str(self.dir / f"{client}.pem"), str(self.dir / f"{client}.key")
        return TlsUA("127.0.0.1", self.ports[listener], ca=ca or str(self.dir / "ca.pem"),
                     server_hostname=sni, cert=cert, key=key)

    def options(self, ua: TlsUA):
        return ua.request("OPTIONS", f"sip:127.0.0.1:{self.stack.sip_port}")


def issue(ca: trustme.CA, d: Path, name: str, *identities: str) -> None:
    leaf = ca.issue_cert(*identities)
    leaf.cert_chain_pems[0].write_to_path(d / f"{name}.pem")
    leaf.private_key_pem.write_to_path(d / f"{name}.key")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[Lab]:
    d = tmp_path_factory.mktemp("profiles")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    issue(ca, d, "default", "localhost", "127.0.0.1")
    issue(ca, d, "a", "a.example.test")
    issue(ca, d, "b", "*.b.example.test")
    issue(ca, d, "good-client", "client.example.test")
    issue(other_ca, d, "stranger", "client.example.test")
    revoked = ca.issue_cert("revoked.example.test")
    revoked.cert_chain_pems[0].write_to_path(d / "revoked.pem")
    revoked.private_key_pem.write_to_path(d / "revoked.key")
    write_crl(ca, revoked, d / "crl.pem")
    ports = {k: free_tcp_udp_port() for k in ("strict", "mtls", "optional", "reload")}
    extra = f"""
[profile.site_a]
certificate = "{d / 'a.pem'}"
private_key = "{d / 'a.key'}"
server_names = ["a.example.test"]

[profile.site_b]
certificate = "{d / 'b.pem'}"
private_key = "{d / 'b.key'}"
server_names = ["*.b.example.test"]

[profile.mtls]
certificate = "{d / 'default.pem'}"
private_key = "{d / 'default.key'}"
ca_list = "{d / 'ca.pem'}"
crl = "{d / 'crl.pem'}"
verify_client = "on"

[profile.optional]
certificate = "{d / 'default.pem'}"
private_key = "{d / 'default.key'}"
ca_list = "{d / 'ca.pem'}"
verify_client = "optional"

[[listener]]
address = "127.0.0.1:{ports['strict']}"
profile = "default"
profiles = ["site_a", "site_b"]
strict_sni = true

[[listener]]
address = "127.0.0.1:{ports['reload']}"
profile = "reloadable"

[[listener]]
address = "127.0.0.1:{ports['mtls']}"
profile = "mtls"

[[listener]]
address = "127.0.0.1:{ports['optional']}"
profile = "optional"

[profile.reloadable]
certificate = "{d / 'live.pem'}"
private_key = "{d / 'live.key'}"
"""
    shutil.copy(d / "default.pem", d / "live.pem")
    shutil.copy(d / "default.key", d / "live.key")
    # The main listener (stack.tls_port) serves site_a / site_b by SNI, else the default.
    s = start_stack(d, {"ca": d / "ca.pem", "cert": d / "default.pem", "key": d / "default.key"},
                    extra=extra, listener_extra='profiles = ["site_a", "site_b"]')
    ports["main"] = s.tls_port
    yield Lab(s, d, ports, ca)
    stop_stack(s)


def served_cn(ua: TlsUA) -> str:
    der = ua.sock.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)[0]


@pytest.mark.parametrize(("sni", "expected"), [
    ("a.example.test", "a.example.test"),
    ("x.b.example.test", "*.b.example.test"),
    ("localhost", "localhost"),
    (None, "localhost"),
])
def test_sni_picks_the_profile(lab: Lab, sni: str | None, expected: str) -> None:
    ua = lab.ua("main", sni=sni, ca=None if sni else str(lab.dir / "ca.pem"))
    try:
        assert served_cn(ua) == expected
        reply = lab.options(ua)
        assert reply.status == 200
        assert f"sni={sni or '-'};" in reply.get("X-TLS")
    finally:
        ua.close()


def test_strict_sni_refuses_an_unknown_name(lab: Lab) -> None:
    with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
        lab.ua("strict", sni="unknown.example.test")
    failed = lab.stack.events.wait_for(lambda e: e.type == ev.TLS_FAILED
                                       and e.conn.listener.endswith(f":{lab.ports['strict']}"))
    assert failed.reason == "sni_refused"
    assert "unknown.example.test" in failed.fields["detail"]
    ua = lab.ua("strict", sni="a.example.test")  # a known name still works
    try:
        assert lab.options(ua).status == 200
    finally:
        ua.close()


def mtls_refusal(lab: Lab, client: str | None, version: ssl.TLSVersion) -> tuple[str, str]:
    """Connect to the mutual-TLS listener and send an OPTIONS; (our address, the TLS error we
    were refused with). The refusal must be a TLS alert: silence (a timeout) or a plain close
    fails the test, as does a reply."""
    ctx = ssl.create_default_context(cafile=str(lab.dir / "ca.pem"))
    ctx.minimum_version = ctx.maximum_version = version
    if client:
        ctx.load_cert_chain(str(lab.dir / f"{client}.pem"), str(lab.dir / f"{client}.key"))
    raw = socket.create_connection(("127.0.0.1", lab.ports["mtls"]), timeout=5)
    peer = format_addr(*raw.getsockname()[:2])
    try:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
        except ssl.SSLError as exc:  # TLS 1.2: refused in the handshake
            return peer, f"{exc.reason}: {exc}"
        # TLS 1.3: our handshake is done before the server has checked our certificate; its
        # refusal is the alert our first read gets.
        tls.sendall(build_request("OPTIONS", f"sip:127.0.0.1:{lab.stack.sip_port}",
                                  via_proto="TLS", local=tls.getsockname()[:2]))
        try:
            data = tls.recv(65536)
        except ssl.SSLError as exc:
            return peer, f"{exc.reason}: {exc}"
        pytest.fail(f"not refused with an alert: the client read {data[:60]!r}")
    finally:
        raw.close()


MTLS_VERSIONS = pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2,
                                                    ssl.TLSVersion.TLSv1_3],
                                        ids=lambda v: v.name)


@MTLS_VERSIONS
def test_mtls_refuses_no_certificate(lab: Lab, version: ssl.TLSVersion) -> None:
    peer, seen = mtls_refusal(lab, None, version)
    want = "CERTIFICATE_REQUIRED" if version is ssl.TLSVersion.TLSv1_3 else "HANDSHAKE_FAILURE"
    assert want in seen, seen
    failed = lab.stack.events.wait_for(lambda e: e.type == ev.TLS_FAILED and e.conn.peer == peer)
    assert failed.reason == "handshake_failed", failed.fields
    assert "DID_NOT_RETURN_A_CERTIFICATE" in failed.fields["detail"].upper(), failed.fields
    assert not [e for e in lab.stack.events.of(ev.TLS_ESTABLISHED) if e.conn.peer == peer]


@MTLS_VERSIONS
@pytest.mark.parametrize(("client", "alert", "detail"), [
    ("stranger", "UNKNOWN_CA", "unable to get local issuer certificate"),
    ("revoked", "CERTIFICATE_REVOKED", "certificate revoked"),
])
def test_mtls_refuses_bad_certificates(lab: Lab, client: str, alert: str, detail: str,
                                       version: ssl.TLSVersion) -> None:
    peer, seen = mtls_refusal(lab, client, version)
    assert alert in seen, seen
    failed = lab.stack.events.wait_for(lambda e: e.type == ev.TLS_FAILED and e.conn.peer == peer)
    assert failed.reason == "verify_failed", failed.fields
    assert failed.fields["detail"] == detail, failed.fields
    assert not [e for e in lab.stack.events.of(ev.TLS_ESTABLISHED) if e.conn.peer == peer]


def test_mtls_good_certificate_is_visible_in_routing(lab: Lab) -> None:
    ua = lab.ua("mtls", sni="localhost", client="good-client")
    try:
        reply = lab.options(ua)
        assert reply.status == 200
        assert "verified=1" in reply.get("X-TLS")
        client = reply.get("X-TLS-Client")
        leaf = x509.load_pem_x509_certificate((lab.dir / "good-client.pem").read_bytes())
        fp = leaf.fingerprint(hashes.SHA256()).hex(":").upper()
        assert f"fingerprint={fp}" in client
        assert "san=client.example.test" in client
        assert "subject=" in client
    finally:
        ua.close()


@pytest.mark.parametrize(("client", "verified"), [(None, "0"), ("good-client", "1")])
def test_optional_client_certificate(lab: Lab, client: str | None, verified: str) -> None:
    ua = lab.ua("optional", sni="localhost", client=client)
    try:
        reply = lab.options(ua)
        assert reply.status == 200 and f"verified={verified}" in reply.get("X-TLS")
    finally:
        ua.close()


def reload_cli(lab: Lab) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlsbridge.daemon.cli", "reload", "-c", str(lab.stack.daemon.config),
         "--timeout", "10"], capture_output=True, text=True, timeout=20)


def test_reload_new_certificate_keeps_live_connections(lab: Lab) -> None:
    live = lab.ua("reload")
    try:
        assert served_cn(live) == "localhost"
        assert lab.options(live).status == 200
        issue(lab.ca, lab.dir, "renewed", "renewed.example.test")
        shutil.copy(lab.dir / "renewed.pem", lab.dir / "live.pem")
        shutil.copy(lab.dir / "renewed.key", lab.dir / "live.key")
        out = reload_cli(lab)
        assert out.returncode == 0, out.stderr
        assert "profile.reloadable" in out.stdout
        lab.stack.events.wait_for(lambda e: e.type == ev.CONFIG_RELOADED)
        # New handshakes get the renewed certificate...
        fresh = lab.ua("reload")
        try:
            assert served_cn(fresh) == "renewed.example.test"
            assert lab.options(fresh).status == 200
        finally:
            fresh.close()
        # ...while the established connection keeps carrying SIP.
        assert lab.options(live).status == 200
    finally:
        live.close()


def test_reload_with_a_broken_key_changes_nothing(lab: Lab) -> None:
    live = lab.ua("reload")
    before = served_cn(live)
    good_key = (lab.dir / "live.key").read_bytes()
    try:
        (lab.dir / "live.key").write_bytes((lab.dir / "a.key").read_bytes())  # not its key
        out = reload_cli(lab)
        assert out.returncode != 0
        assert "profile 'reloadable'" in out.stderr and "live.key" in out.stderr
        failed = lab.stack.events.wait_for(lambda e: e.type == ev.CONFIG_RELOAD_FAILED)
        assert "live.key" in failed.fields["reason"]
        # Nothing changed: the live connection and new ones are served as before.
        assert lab.options(live).status == 200
        again = lab.ua("reload")
        try:
            assert served_cn(again) == before
            assert lab.options(again).status == 200
        finally:
            again.close()
    finally:
        (lab.dir / "live.key").write_bytes(good_key)
        live.close()


def test_expiring_certificates_are_published(lab: Lab) -> None:
    config = lab.stack.daemon.config
    text = config.read_text()
    config.write_text(text.replace("[daemon]\n", "[daemon]\ncert_expiry_days = 10000000\n", 1))
    try:
        assert reload_cli(lab).returncode == 0
        expiring = lab.stack.events.wait_for(lambda e: e.type == ev.CERT_EXPIRING)
        assert expiring.fields["days_left"] > 0 and expiring.fields["not_after"].endswith("Z")
        assert expiring.fields["owner"].startswith("profile.")
    finally:
        config.write_text(text)
        reload_cli(lab)


def test_sighup_and_watched_files_reload(tmp_path: Path, certs: dict[str, Path]) -> None:
    """The two other ways README names: `kill -HUP` and `watch_files = true`."""
    import os
    import signal

    from tests.integration.conftest import start_stack, stop_stack

    stack = start_stack(tmp_path, certs, with_kamailio=False, daemon_extra="watch_files = true")
    try:
        os.kill(stack.daemon.pid, signal.SIGHUP)
        stack.events.wait_for(lambda e: e.type == ev.CONFIG_RELOADED)
        config = stack.daemon.config
        config.write_text(config.read_text().replace("handshake_timeout = 5.0",
                                                     "handshake_timeout = 6.0"))
        changed = stack.events.wait_for(lambda e: e.type == ev.CONFIG_RELOADED
                                        and "handshake_timeout" in e.fields["changed"],
                                        timeout=10)
        assert changed.fields["restart_needed"] == []
    finally:
        stop_stack(stack)
