"""Debian's own kamailio.cfg and tls.cfg move to tlsbridge by the steps of docs/migration.md.

The files the `kamailio` package installs are copied (the operator's kamailio-local.cfg puts
their sockets on loopback, on free ports; the tls.cfg's certificate paths point at test
certificates), run once with tls.so as the baseline, then migrated with the documented commands
(`tlsbridge import-tls-cfg`, `tlsbridge migrate-cfg`, `tlsbridge check`) and run with the real
daemon, with both values of the stock `append_fromtag`. Routing stays Debian's native cfg.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_routing import call, hang_up, uniq
from tests.support import requirements
from tests.support.procs import Daemon, Proc, free_tcp_udp_port, wait_until
from tests.support.sip import TlsUA, UdpUA, build_request
from tests.support.ua import SipUA

pytestmark = pytest.mark.integration

STOCK = Path("/etc/kamailio")
TLSBRIDGE = str(Path(sys.prefix) / "bin" / "tlsbridge")
WITH_TLS = ["-A", "WITH_TLS"]
# What a phone must never see, and what Kamailio must never log, once TLS is the bridge's job.
FORBIDDEN_LOG = ("no corresponding socket", "is_direction", "no socket found to match second RR",
                 "Traceback", "TypeError", "SystemError", "Unhandled exception")

@pytest.fixture(autouse=True, scope="module")
def _stock_files() -> None:
    if not (STOCK / "kamailio.cfg").is_file() or not (STOCK / "tls.cfg").is_file():
        requirements.missing("Debian's kamailio.cfg and tls.cfg (apt-get install kamailio "
                             "kamailio-tls-modules)")


@dataclass
class Site:
    """An operator's /etc/kamailio, copied from the package's files."""

    etc: Path
    work: Path
    sip_port: int
    tls_port: int
    hairpin_port: int

    @property
    def cfg(self) -> Path:
        return self.etc / "kamailio.cfg"


def stock_site(work: Path, certs: dict[str, Path], append_fromtag: int) -> Site:
    etc = work / "etc"
    etc.mkdir(parents=True)
    site = Site(etc, work, *(free_tcp_udp_port() for _ in range(3)))
    cfg = (STOCK / "kamailio.cfg").read_text()
    cfg = cfg.replace('"/etc/kamailio/tls.cfg"', f'"{etc}/tls.cfg"')
    if append_fromtag:
        stock = 'modparam("rr", "append_fromtag", 0)'
        assert stock in cfg
        cfg = cfg.replace(stock, stock.replace("0)", "1)"))
    site.cfg.write_text(cfg)
    tls = (STOCK / "tls.cfg").read_text()
    tls = tls.replace("/etc/kamailio/kamailio-selfsigned.key", str(certs["key"]))
    tls = tls.replace("/etc/kamailio/kamailio-selfsigned.pem", str(certs["cert"]))
    (etc / "tls.cfg").write_text(tls)
    # The stock cfg binds every address without listen= lines: the operator's local file
    # (imported by the stock cfg) keeps the test on loopback.
    (etc / "kamailio-local.cfg").write_text(
        f"listen=udp:127.0.0.1:{site.sip_port}\nlisten=tcp:127.0.0.1:{site.sip_port}\n"
        f"listen=tls:127.0.0.1:{site.tls_port}\n")
    return site


def start_kamailio(site: Site, name: str, env: dict[str, str] | None = None) -> Proc:
    run = site.work / name
    run.mkdir()
    argv = ["kamailio", "-f", str(site.cfg), "-DD", "-E", *WITH_TLS, "-Y", str(run),
            "-P", str(run / "kamailio.pid")]
    proc = Proc(name, argv, site.work / f"{name}.log", dict(os.environ, **(env or {})))
    ua = UdpUA()
    try:
        def answers() -> bool:
            if not proc.alive():
                raise RuntimeError(f"kamailio exited:\n{proc.tail()}")
            ua.send(build_request("OPTIONS", f"sip:127.0.0.1:{site.sip_port}", via_proto="UDP",
                                  local=ua.local), ("127.0.0.1", site.sip_port))
            try:
                return ua.read(0.3).status == 200
            except OSError:
                return False
        wait_until(answers, 20, "the stock kamailio to answer OPTIONS")
    except BaseException:
        proc.stop()
        raise
    finally:
        ua.close()
    return proc


def tlsbridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TLSBRIDGE, *args], capture_output=True, text=True, timeout=60)


def migrate(site: Site) -> Path:
    """The guide's steps 2-4, literally."""
    toml = site.etc / "tlsbridge.toml"
    out = tlsbridge("import-tls-cfg", str(site.etc / "tls.cfg"), "--tls-port",
                    str(site.tls_port), "--listen-ip", "127.0.0.1", "--hairpin",
                    f"127.0.0.1:{site.hairpin_port}", "--run-dir", str(site.work / "run"),
                    "--sip-address", f"127.0.0.1:{site.sip_port}")
    assert out.returncode == 0, out.stderr
    toml.write_text(out.stdout)
    out = tlsbridge("migrate-cfg", "--in-place", str(site.cfg), *WITH_TLS, "--hairpin",
                    f"127.0.0.1:{site.hairpin_port}", "--tls-address",
                    f"127.0.0.1:{site.tls_port}", "--bridge-config", str(toml))
    assert out.returncode == 0, out.stderr
    assert (site.etc / "tlsbridge_native.py").exists()  # written for app_python3
    return toml


@dataclass
class Migrated:
    site: Site
    toml: Path
    kamailio: Proc
    daemon: Daemon

    @property
    def tls_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.site.tls_port)

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.site.sip_port}"  # myself: the stock cfg relays nothing else

    def phone(self, user: str, *, proto: str, source: str | None = None) -> SipUA:
        if proto == "tls":
            return SipUA(user, domain=self.domain, proxy=self.tls_addr,
                         tls=TlsUA(*self.tls_addr, ca=str(self.site.work / "ca.pem"),
                                   source=source))
        return SipUA(user, domain=self.domain, proxy=("127.0.0.1", self.site.sip_port),
                     udp=UdpUA())

    def log(self) -> str:
        return self.kamailio.log.read_text(errors="replace")


class OtherContactUA(SipUA):
    """A TLS phone whose Contact names a port it listens on, not its source port."""

    def __init__(self, *args: object, contact_port: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.contact_port = contact_port

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{self.local[0]}:{self.contact_port};transport=tls"


@pytest.fixture(scope="module", params=[0, 1], ids=["append_fromtag=0", "append_fromtag=1"])
def append_fromtag(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path],
             append_fromtag: int) -> Iterator[Migrated]:
    site = stock_site(tmp_path_factory.mktemp(f"stock{append_fromtag}"), certs, append_fromtag)
    shutil.copy(certs["ca"], site.work / "ca.pem")
    toml = migrate(site)
    daemon = Daemon(site.work, toml)
    kamailio = None
    try:
        daemon.wait_ready()
        kamailio = start_kamailio(site, "kamailio")  # the written script knows its venv
        yield Migrated(site, toml, kamailio, daemon)
    finally:
        if kamailio is not None:
            print(f"--- kamailio log ---\n{kamailio.tail(40)}")
            kamailio.stop()
        daemon.stop()


def test_baseline_stock_cfg_with_tls_so(tmp_path: Path, certs: dict[str, Path]) -> None:
    """Before: Debian's cfg with WITH_TLS and tls.so serves a TLS phone itself."""
    site = stock_site(tmp_path, certs, 0)
    kamailio = start_kamailio(site, "baseline")
    tls = ("127.0.0.1", site.tls_port)
    alice = SipUA(uniq("alice"), domain=f"127.0.0.1:{site.sip_port}", proxy=tls,
                  tls=TlsUA(*tls, ca=str(certs["ca"])))
    bob = SipUA(uniq("bob"), domain=f"127.0.0.1:{site.sip_port}",
                proxy=("127.0.0.1", site.sip_port), udp=UdpUA())
    try:
        assert alice.register().status == 200
        _, d_alice, _ = call(bob, alice, f"sip:{alice.user}@127.0.0.1:{site.sip_port}")
        hang_up(alice, d_alice, bob)
    finally:
        alice.close()
        bob.close()
        kamailio.stop()


def test_check_finds_what_breaks_the_stock_cfg_and_passes_the_migrated_one(
        tmp_path: Path, certs: dict[str, Path], migrated: Migrated) -> None:
    stock = stock_site(tmp_path, certs, 0)
    out = tlsbridge("check", "-c", str(migrated.toml), "--offline",
                    "--kamailio-cfg", str(stock.cfg), *WITH_TLS)
    assert out.returncode == 1, out.stdout
    for expected in ("tls.so is loaded", "enable_tls = yes", "tcp_accept_haproxy is not yes",
                     "registrar has no received_avp", "no hairpin listener",
                     "other plain TCP listeners (tcp:127.0.0.1:", "listen=tls:... remains",
                     "native routing that never calls the bridge"):
        assert f"error: {expected}" in out.stdout, (expected, out.stdout)
    # Without WITH_TLS the stock cfg loads no tls.so: an #!ifdef is read as Kamailio reads it.
    out = tlsbridge("check", "-c", str(migrated.toml), "--offline",
                    "--kamailio-cfg", str(stock.cfg))
    assert "tls.so is loaded" not in out.stdout and "enable_tls" not in out.stdout
    out = tlsbridge("check", "-c", str(migrated.toml), "--offline",
                    "--kamailio-cfg", str(migrated.site.cfg), *WITH_TLS)
    assert out.returncode == 0, out.stdout
    assert "error:" not in out.stdout and "warning: rr" not in out.stdout, out.stdout


def test_tls_phone_registers_and_nothing_internal_shows(migrated: Migrated) -> None:
    alice = migrated.phone(uniq("alice"), proto="tls")
    try:
        ok = alice.register()
        assert ok.status == 200
        contact = ok.get("Contact")
        # registrar shows the received address: the phone's own, over TLS.
        assert f'received="sip:{alice.local[0]}:{alice.local[1]};transport=tls"' in contact
        assert "tlsb" not in contact and str(migrated.site.hairpin_port) not in contact
    finally:
        alice.close()


@pytest.mark.parametrize("bye_from", ["caller", "callee"])
@pytest.mark.parametrize(("caller_proto", "callee_proto"),
                         [("udp", "tls"), ("tls", "udp"), ("tls", "tls")])
def test_calls_through_the_migrated_stock_cfg(migrated: Migrated, caller_proto: str,
                                              callee_proto: str, bye_from: str) -> None:
    caller = migrated.phone(uniq("caller"), proto=caller_proto)
    callee = migrated.phone(uniq("callee"), proto=callee_proto)
    try:
        assert callee.register().status == 200
        d_caller, d_callee, msgs = call(caller, callee,
                                        f"sip:{callee.user}@127.0.0.1:{migrated.site.sip_port}")
        sip, tls = f"127.0.0.1:{migrated.site.sip_port}", f"127.0.0.1:{migrated.site.tls_port}"
        rr = " ".join(msgs["invite"].get_all("Record-Route"))
        # Each side sees the address it can reach: never the hairpin, never tlsb=.
        assert str(migrated.site.hairpin_port) not in rr and "tlsb=" not in rr, rr
        if callee_proto == "udp":
            assert rr.startswith(f"<sip:{sip};"), rr
        else:
            assert rr.startswith(f"<sip:{tls};transport=tls;"), rr
        if caller_proto != callee_proto:
            assert sip in rr and tls in rr, rr
        if callee_proto == "tls":
            # Our Via names the public TLS address (as tls.so's would), never the hairpin.
            assert msgs["invite"].get("Via").startswith(f"SIP/2.0/TCP {tls};"), \
                msgs["invite"].get("Via")
        if bye_from == "caller":
            hang_up(caller, d_caller, callee)
        else:
            hang_up(callee, d_callee, caller)
    finally:
        caller.close()
        callee.close()
    assert not [bad for bad in FORBIDDEN_LOG if bad in migrated.log()]


def _trap(host: str) -> socket.socket:
    """A listener on the address a phone's Contact names: nothing may ever connect to it."""
    trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    trap.bind((host, 0))
    trap.listen(8)
    trap.setblocking(False)
    return trap


def _never_dialled(trap: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        trap.accept()


@pytest.mark.parametrize("tls_side", ["callee", "caller"])
def test_phone_whose_contact_port_is_not_its_source_port(migrated: Migrated,
                                                          tls_side: str) -> None:
    trap = _trap("127.0.0.1")
    tls_phone = OtherContactUA(uniq("olga"), domain=migrated.domain, proxy=migrated.tls_addr,
                               tls=TlsUA(*migrated.tls_addr,
                                         ca=str(migrated.site.work / "ca.pem")),
                               contact_port=trap.getsockname()[1])
    udp_phone = migrated.phone(uniq("pete"), proto="udp")
    try:
        assert tls_phone.register().status == 200
        target = udp_phone if tls_side == "caller" else tls_phone
        assert target.register().status == 200
        caller, callee = (udp_phone, tls_phone) if tls_side == "callee" \
            else (tls_phone, udp_phone)
        d_caller, d_callee, _ = call(caller, callee,
                                     f"sip:{callee.user}@127.0.0.1:{migrated.site.sip_port}")
        # The ACK and BYEs both ways reach the TLS phone over its own connection.
        hang_up(udp_phone, d_caller if caller is udp_phone else d_callee, tls_phone)
        d2_caller, d2_callee, _ = call(caller, callee,
                                       f"sip:{callee.user}@127.0.0.1:{migrated.site.sip_port}")
        hang_up(tls_phone, d2_caller if caller is tls_phone else d2_callee, udp_phone)
        _never_dialled(trap)
    finally:
        trap.close()
        tls_phone.close()
        udp_phone.close()
    assert not [bad for bad in FORBIDDEN_LOG if bad in migrated.log()]


def test_phone_whose_connection_is_gone_gets_477_and_is_never_dialled(
        migrated: Migrated) -> None:
    trap = _trap("127.0.0.2")
    gone = OtherContactUA(uniq("quinn"), domain=migrated.domain, proxy=migrated.tls_addr,
                          tls=TlsUA(*migrated.tls_addr, ca=str(migrated.site.work / "ca.pem"),
                                    source="127.0.0.2"),
                          contact_port=trap.getsockname()[1])
    caller = migrated.phone(uniq("rita"), proto="udp")
    try:
        assert gone.register().status == 200
        peer = "{}:{}".format(*gone.local)
        gone.tls.sock.unwrap().close()  # type: ignore[union-attr]
        wait_until(lambda: not any(c["conn"]["peer"] == peer for c in
                                   migrated.daemon.request("list")["conns"]),
                   5, "the daemon to close the phone's connection")
        time.sleep(0.2)  # Kamailio learns of the close from the hairpin's FIN
        d = caller.invite(f"sip:{gone.user}@127.0.0.1:{migrated.site.sip_port}")
        final = caller.expect(status=477, timeout=5)
        assert final.get("Call-ID") == d.call_id
        _never_dialled(trap)  # neither Kamailio in plaintext nor the daemon over TLS
    finally:
        trap.close()
        gone.close()
        caller.close()
    assert not [bad for bad in FORBIDDEN_LOG if bad in migrated.log()]


def test_cfgengine_beside_native_routes_is_refused_at_start_up(
        tmp_path: Path, certs: dict[str, Path], migrated: Migrated) -> None:
    site = stock_site(tmp_path, certs, 0)
    shutil.copytree(migrated.site.etc, site.etc, dirs_exist_ok=True)
    site.cfg.write_text(re.sub(r'(modparam\("app_python3", "load", "[^"]+"\))',
                               r'\1\ncfgengine "python"', migrated.site.cfg.read_text()))
    assert 'cfgengine "python"' in site.cfg.read_text()
    with pytest.raises(RuntimeError, match="kamailio exited") as err:
        start_kamailio(site, "refused")
    assert 'cfgengine "python" with native route blocks' in str(err.value)
