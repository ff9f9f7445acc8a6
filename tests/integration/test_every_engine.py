"""Documented behaviour that depends on the TLS engine, against the running daemon and Kamailio,
once per engine variant (openssl, pyopenssl, gnutls, and openssl with two workers):

- hot reload: a live connection carries on, new handshakes get the renewed certificate;
- CRL, inbound (a revoked client) and outbound (a revoked server: verify_failed);
- RFC 5922 outbound: without an SNI the name checked is the target host; `verify_name`
  overrides it; a name that does not resolve fails with `dns_failed`;
- a GnuTLS client (`gnutls-cli`) gets its answer through the daemon;
- clients below TLS 1.2 are refused; compression is never chosen.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.integration.conftest import Stack, base_engine, start_stack, stop_stack
from tests.support.procs import wait_until
from tests.support.requirements import program
from tests.support.sip import TlsUA, build_request
from tests.support.trunk import TlsTrunk
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.events import Event

pytestmark = [pytest.mark.integration]


def issue(ca: trustme.CA, d: Path, name: str, *identities: str) -> trustme.LeafCert:
    leaf = ca.issue_cert(*identities)
    leaf.cert_chain_pems[0].write_to_path(d / f"{name}.pem")
    leaf.private_key_pem.write_to_path(d / f"{name}.key")
    return leaf


def write_crl(ca: trustme.CA, revoked: list[trustme.LeafCert], path: Path) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=1))
               .next_update(now + datetime.timedelta(days=1)))
    for leaf in revoked:
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - datetime.timedelta(minutes=1)).build())
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


@dataclass
class World:
    stack: Stack
    dir: Path
    ca: trustme.CA
    engine: str
    ports: dict[str, int]
    trunk: TlsTrunk
    revoked_trunk: TlsTrunk

    def ua(self, listener: str = "main", client: str | None = None,
           server_hostname: str | None = "localhost") -> TlsUA:
        cert = key = None
        if client:
            cert, key = str(self.dir / f"{client}.pem"), str(self.dir / f"{client}.key")
        port = self.stack.tls_port if listener == "main" else self.ports[listener]
        return TlsUA("127.0.0.1", port, ca=str(self.dir / "ca.pem"), cert=cert, key=key,
                     server_hostname=server_hostname)

    def options(self, ua: TlsUA) -> str:
        reply = ua.request("OPTIONS", f"sip:127.0.0.1:{self.stack.sip_port}")
        assert reply.status == 200, reply.first_line
        return reply.get("X-TLS")

    def connect(self, **args: object) -> Event:
        """A control `connect`; the outbound.ready or outbound.failed it ends in."""
        tag = uuid.uuid4().hex
        reply = self.stack.daemon.request("connect", tag=tag, **args)
        assert reply["state"] == "pending", reply  # every target here is a new one
        return self.stack.events.wait_for(
            lambda e: e.type in (ev.OUTBOUND_READY, ev.OUTBOUND_FAILED)
            and tag in e.fields.get("tags", []), timeout=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[World]:
    d = tmp_path_factory.mktemp(f"every-engine-{engine}")
    base = base_engine(engine)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    issue(ca, d, "default", "localhost", "127.0.0.1")
    issue(ca, d, "good-client", "client.example.test")
    revoked_client = issue(ca, d, "revoked-client", "revoked.example.test")
    issue(ca, d, "trunk", "trunk.example.test", "127.0.0.1")
    revoked_server = issue(ca, d, "revoked-trunk", "trunk.example.test", "127.0.0.1")
    write_crl(ca, [revoked_client, revoked_server], d / "crl.pem")
    shutil.copy(d / "default.pem", d / "live.pem")
    shutil.copy(d / "default.key", d / "live.key")
    trunk = TlsTrunk(d / "trunk.pem", d / "trunk.key")
    revoked_trunk = TlsTrunk(d / "revoked-trunk.pem", d / "revoked-trunk.key")
    from tests.support.procs import free_tcp_udp_port

    ports = {k: free_tcp_udp_port() for k in ("mtls", "reload")}
    extra = f"""
[profile.mtls]
certificate = "{d / 'default.pem'}"
private_key = "{d / 'default.key'}"
ca_list = "{d / 'ca.pem'}"
crl = "{d / 'crl.pem'}"
verify_client = "on"
engine = "{base}"

[profile.reloadable]
certificate = "{d / 'live.pem'}"
private_key = "{d / 'live.key'}"
engine = "{base}"

[[listener]]
address = "127.0.0.1:{ports['mtls']}"
profile = "mtls"

[[listener]]
address = "127.0.0.1:{ports['reload']}"
profile = "reloadable"

[outbound]
connect_timeout = 2.5

[client.default]
ca_list = "{d / 'ca.pem'}"
crl = "{d / 'crl.pem'}"
engine = "{base}"

[client.pinned]
ca_list = "{d / 'ca.pem'}"
verify_name = "trunk.example.test"
engine = "{base}"

[client.pinned_elsewhere]
ca_list = "{d / 'ca.pem'}"
verify_name = "nobody.example.test"
engine = "{base}"
"""
    certs = {"ca": d / "ca.pem", "cert": d / "default.pem", "key": d / "default.key"}
    stack = start_stack(d, certs, extra=extra, engine=engine)
    try:
        yield World(stack, d, ca, engine, ports, trunk, revoked_trunk)
    finally:
        stop_stack(stack)
        trunk.close()
        revoked_trunk.close()


def served_names(ua: TlsUA) -> list[str]:
    cert = x509.load_der_x509_certificate(ua.sock.getpeercert(binary_form=True))
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


# -- reload ---------------------------------------------------------------------------------


def test_reload_keeps_live_connections(world: World) -> None:
    live = world.ua("reload")
    try:
        assert served_names(live) == ["localhost"]
        assert "verified=0" in world.options(live)
        issue(world.ca, world.dir, "renewed", "renewed.example.test")
        shutil.copy(world.dir / "renewed.pem", world.dir / "live.pem")
        shutil.copy(world.dir / "renewed.key", world.dir / "live.key")
        reply = world.stack.daemon.request("reload")
        assert "profile.reloadable" in str(reply), reply
        reloaded = world.stack.events.wait_for(lambda e: e.type == ev.CONFIG_RELOADED)
        assert "profile.reloadable" in str(reloaded.fields["changed"]), reloaded.fields
        # New handshakes get the renewed certificate, from every worker (with two, connect
        # until both have served one: the kernel spreads connections by address hash).
        workers = 2 if "-x2" in world.engine else 1
        served_by: set[int] = set()
        for attempt in range(40):
            fresh = world.ua("reload", server_hostname=None)  # the chain is checked
            try:
                peer = format_addr(*fresh.local)
                assert served_names(fresh) == ["renewed.example.test"]
                world.options(fresh)
            finally:
                fresh.close()
            est = world.stack.events.wait_for(lambda e, p=peer: e.type == ev.TLS_ESTABLISHED
                                              and e.conn.peer == p)
            served_by.add((est.conn.id - 1) % workers)
            if len(served_by) == workers and attempt >= 3:  # at least four handshakes
                break
        assert len(served_by) == workers, f"only worker(s) {served_by} served a new handshake"
        # ...while the live connection carries on, on its old session.
        for _ in range(3):
            assert world.options(live)
        assert served_names(live) == ["localhost"]
    finally:
        live.close()


# -- CRL ------------------------------------------------------------------------------------


def test_crl_inbound_refuses_a_revoked_client(world: World) -> None:
    good = world.ua("mtls", client="good-client")
    try:
        assert "verified=1" in world.options(good)
    finally:
        good.close()
    ctx = ssl.create_default_context(cafile=str(world.dir / "ca.pem"))
    ctx.load_cert_chain(str(world.dir / "revoked-client.pem"),
                        str(world.dir / "revoked-client.key"))
    raw = socket.create_connection(("127.0.0.1", world.ports["mtls"]), timeout=5)
    peer = format_addr(*raw.getsockname()[:2])
    try:
        with pytest.raises(ssl.SSLError):  # an alert; a timeout would be a TimeoutError
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(build_request("OPTIONS", f"sip:127.0.0.1:{world.stack.sip_port}",
                                      via_proto="TLS", local=tls.getsockname()[:2]))
            got = tls.recv(65536)  # TLS 1.3: the refusal comes after our Finished
            pytest.fail(f"a revoked client was served: {got[:60]!r}")
    finally:
        raw.close()
    failed = world.stack.events.wait_for(lambda e: e.type == ev.TLS_FAILED
                                         and e.conn.peer == peer)
    assert failed.reason == "verify_failed", failed.fields
    assert "revoked" in failed.fields["detail"].lower(), failed.fields


def test_crl_outbound_refuses_a_revoked_server(world: World) -> None:
    good = world.connect(host="127.0.0.1", port=world.trunk.port, sni="trunk.example.test")
    assert good.type == ev.OUTBOUND_READY, good.fields
    bad = world.connect(host="127.0.0.1", port=world.revoked_trunk.port,
                        sni="trunk.example.test")
    assert bad.type == ev.OUTBOUND_FAILED and bad.reason == "verify_failed", bad.fields
    assert "revoked" in bad.fields["detail"].lower(), bad.fields
    wait_until(lambda: bool(world.revoked_trunk.handshake_errors), 5,
               "the revoked server to see the handshake fail")
    assert not world.revoked_trunk.conns


# -- RFC 5922 -------------------------------------------------------------------------------


def test_without_sni_the_target_host_is_checked(world: World) -> None:
    """The server's certificate names trunk.example.test and 127.0.0.1, not localhost. (A
    server of its own: a target with no identity beyond its address reuses any connection
    to that address.)"""
    server = TlsTrunk(world.dir / "trunk.pem", world.dir / "trunk.key")
    try:
        check_names_against(world, server.port)
    finally:
        server.close()


def check_names_against(world: World, port: int) -> None:
    by_name = world.connect(host="localhost", port=port)  # checked: "localhost"
    assert by_name.type == ev.OUTBOUND_FAILED and by_name.reason == "verify_failed", \
        by_name.fields
    by_ip = world.connect(host="127.0.0.1", port=port)  # checked: the address, no SNI sent
    assert by_ip.type == ev.OUTBOUND_READY, by_ip.fields
    assert by_ip.tls is not None and by_ip.tls.sni is None
    with_sni = world.connect(host="localhost", port=port, sni="trunk.example.test")
    assert with_sni.type == ev.OUTBOUND_READY, with_sni.fields
    assert with_sni.tls is not None and with_sni.tls.sni == "trunk.example.test"


def test_verify_name_overrides_the_name_checked(world: World) -> None:
    port = world.trunk.port
    pinned = world.connect(host="localhost", port=port, profile="pinned")
    assert pinned.type == ev.OUTBOUND_READY, pinned.fields
    elsewhere = world.connect(host="127.0.0.1", port=port, profile="pinned_elsewhere")
    assert elsewhere.type == ev.OUTBOUND_FAILED and elsewhere.reason == "verify_failed", \
        elsewhere.fields


def test_a_name_that_does_not_resolve_fails_with_dns_failed(world: World) -> None:
    # Not a valid host name: the resolver refuses it without sending a query (loopback only).
    failed = world.connect(host="-no-such-host-", port=5061, sni="trunk.example.test")
    assert failed.type == ev.OUTBOUND_FAILED and failed.reason == "dns_failed", failed.fields
    assert "-no-such-host-" in failed.fields["detail"]


# -- other TLS stacks, old versions, compression ---------------------------------------------


def test_gnutls_cli_gets_its_answer(world: World) -> None:
    gnutls_cli = program("gnutls-cli", "gnutls-bin")
    request = build_request("OPTIONS", f"sip:127.0.0.1:{world.stack.sip_port}", via_proto="TLS",
                            local=("127.0.0.1", 5999))
    proc = subprocess.run(
        [gnutls_cli, "--x509cafile", str(world.dir / "ca.pem"), "--port",
         str(world.stack.tls_port), "--sni-hostname", "localhost", "--verify-hostname",
         "localhost", "127.0.0.1"],
        input=request, capture_output=True, timeout=20, check=False)
    out = proc.stdout.decode(errors="replace")
    assert "SIP/2.0 200 OK" in out, f"{out}\n{proc.stderr.decode(errors='replace')}"
    x_tls = re.search(r"^X-TLS: (.*)$", out, re.M)
    assert x_tls and "sni=localhost;" in x_tls.group(1), out
    peer = re.search(r"peer=(\S+);", x_tls.group(1)).group(1)  # type: ignore[union-attr]
    est = world.stack.events.wait_for(lambda e: e.type == ev.TLS_ESTABLISHED
                                      and e.conn.peer == peer)
    assert est.tls is not None and est.tls.engine == base_engine(world.engine)


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_clients_below_tls_1_2_are_refused(world: World, flag: str) -> None:
    openssl = program("openssl")
    before = {e.conn.id for e in world.stack.events.of(ev.TLS_FAILED)}

    def s_client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{world.stack.tls_port}",
             "-servername", "localhost", "-CAfile", str(world.dir / "ca.pem"), *args],
            input="", capture_output=True, text=True, timeout=20, check=False)

    old = s_client(flag, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert old.returncode != 0, old.stdout
    assert "Cipher is (NONE)" in old.stdout or "no peer certificate" in old.stdout, old.stdout
    # The refusal is the daemon's: the client did connect and say hello.
    failed = world.stack.events.wait_for(lambda e: e.type == ev.TLS_FAILED
                                         and e.conn.id not in before
                                         and e.conn.listener.endswith(
                                             f":{world.stack.tls_port}"))
    assert failed.reason == "handshake_failed", failed.fields
    # The same tool, TLS 1.2: served.
    ok = s_client("-tls1_2")
    assert "Protocol  : TLSv1.2" in ok.stdout or "TLSv1.2" in ok.stdout, ok.stdout


def tls12_hello_offering_deflate() -> bytes:
    """A TLS 1.2 ClientHello that offers DEFLATE compression (and null), for servers with
    ECDSA or RSA keys."""
    def u16(n: int) -> bytes:
        return n.to_bytes(2, "big")

    def ext(kind: int, data: bytes) -> bytes:
        return u16(kind) + u16(len(data)) + data

    suites = b"".join(u16(s) for s in (0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8))
    name = b"localhost"
    groups = b"\x00\x1d\x00\x17\x00\x18"
    sigs = b"\x04\x03\x05\x03\x08\x04\x08\x05\x04\x01\x05\x01"
    exts = (ext(0, u16(len(name) + 3) + b"\x00" + u16(len(name)) + name)
            + ext(10, u16(len(groups)) + groups) + ext(11, b"\x01\x00")
            + ext(13, u16(len(sigs)) + sigs) + ext(0xFF01, b"\x00"))
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + u16(len(suites)) + suites
            + b"\x02\x01\x00" + u16(len(exts)) + exts)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + u16(len(handshake)) + handshake


def test_compression_is_never_chosen(world: World) -> None:
    with socket.create_connection(world.stack.tls_addr, timeout=5) as s:
        s.sendall(tls12_hello_offering_deflate())
        got = b""
        while len(got) < 5 or len(got) < 5 + int.from_bytes(got[3:5], "big"):
            chunk = s.recv(65536)
            assert chunk, f"closed after {got!r}"
            got += chunk
    assert got[0] == 22, f"not a handshake record: {got[:16]!r}"  # an alert would be 21
    hello = got[5:]
    assert hello[0] == 2, f"not a ServerHello: {hello[:8]!r}"
    at = 4 + 2 + 32  # header, version, random
    at += 1 + hello[at]  # session id
    cipher, compression = hello[at:at + 2], hello[at + 2]
    assert hello[4:6] == b"\x03\x03", hello[4:6]  # TLS 1.2
    assert compression == 0, f"the server chose compression method {compression}"
    assert cipher != b"\x00\x00"
