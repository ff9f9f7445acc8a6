"""The systems under test, each started and stopped by the bench on free loopback ports.

  tlsbridge   our daemon (`tlsbridge run`) + Kamailio with the reference kamailio-cfg/kamailio.cfg
              (hairpin listener, tcp_accept_haproxy, tcp_defer_accept=3) and the configuration's
              KEMI script (the real TlsBridge module).
  haproxy     HAProxy (`mode tcp`, `bind ... ssl crt`, `server ... send-proxy`) + Kamailio with
              the same reference cfg and script; the script's bridge finds no daemon there.
  kamailio    Kamailio's own tls.so: bench/kamailio/kamailio-tls.cfg (the reference cfg's core
              settings and modules, a TLS listener instead of the hairpin) + the same script.
  tlsbridge-pyopenssl, tlsbridge-gnutls  (not run by default) the daemon on another engine
  tlsbridge-1w  (for `--workers N` runs) tlsbridge with one worker: the scaling baseline.

Each runs in one configuration (names.py): "reference", Kamailio runs kamailio-cfg/routing.py
(OPTIONS replies carry the connection's TLS facts), or "alone",
bench/kamailio/routing_nofacts.py (OPTIONS answered without the facts look-up). A tlsbridge
system runs the code of a Tree: this checkout, or an older commit built by revs.py
(tlsbridge@REV): its daemon, its KEMI module, its kamailio.cfg and its scripts.

All use one ECDSA P-256 certificate, the same number of Kamailio children, and the same shared
memory size.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from tlsbench.names import parse_key, system_key
from tlsbench.procs import Proc, free_port, session_pids, wait_until

ROOT = Path(__file__).resolve().parents[2]
BENCH_KAM = ROOT / "bench" / "kamailio"
SCRIPTS = {"reference": "kamailio-cfg/routing.py", "alone": "bench/kamailio/routing_nofacts.py"}


@dataclass(frozen=True)
class Tree:
    """Where a system's tlsbridge comes from: this checkout, or an older commit (revs.py)."""

    root: Path  # its kamailio-cfg/ and bench/kamailio/
    venv: Path  # its tlsbridge is installed here; Kamailio's Python gets it as TLSBRIDGE_VENV
    python: Path  # runs its daemon
    rev: str = ""  # "" for this checkout

    def script(self, config: str) -> Path:
        return self.root / SCRIPTS[config]

    @property
    def kamailio_cfg(self) -> Path:
        return self.root / "kamailio-cfg" / "kamailio.cfg"


CURRENT = Tree(root=ROOT, venv=Path(sys.prefix), python=Path(sys.executable))


@dataclass
class Settings:
    build: Path
    certs: dict[str, Path]
    children: int = 4
    shm_mb: int = 2048
    workers: int = 1
    pin: bool = True
    sut_cpus: set[int] = field(default_factory=lambda: {0})
    daemon_log_level: str = "warning"
    verify: bool = False  # the generator verifies the server's certificate

    @property
    def cpus(self) -> set[int] | None:
        return self.sut_cpus if self.pin else None


# -- SIP probes ---------------------------------------------------------------------------------


def _options(proto: str, host: str, port: int, local: tuple[str, int]) -> bytes:
    return (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{proto} {local[0]}:{local[1]};branch=z9hG4bK-{uuid.uuid4().hex[:16]};"
        "rport\r\n"
        f"From: <sip:probe@localhost>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{host}:{port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def udp_ping(port: int, timeout: float = 0.3) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        try:
            s.send(_options("UDP", "127.0.0.1", port, s.getsockname()))
            return s.recv(65535).startswith(b"SIP/2.0 200")
        except OSError:
            return False


def tls_options(port: int, ca: Path, timeout: float = 2.0) -> str:
    """One OPTIONS over a fresh TLS connection; the reply's head (raises OSError/ssl errors)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(_options("TLS", "127.0.0.1", port, s.getsockname()[:2]))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before a reply")
            data += chunk
        return data.split(b"\r\n\r\n")[0].decode(errors="replace")


# -- systems ------------------------------------------------------------------------------------


class System:
    key = ""  # the base system (names.BASES)

    def __init__(self, settings: Settings, workdir: Path, config: str = "reference",
                 tree: Tree = CURRENT) -> None:
        self.s = settings
        self.workdir = workdir
        self.tree = tree
        self.script = tree.script(config)
        self.name = system_key(self.key, config, tree.rev)
        self.procs: dict[str, Proc] = {}
        self.tls_port = 0
        self.ctl = ""
        self.reply_head = ""

    # what the bench reads
    def pids(self) -> list[int]:
        return session_pids(p.pid for p in self.procs.values())

    def component_pids(self) -> dict[str, list[int]]:
        return {name: session_pids([p.pid]) for name, p in self.procs.items()}

    def shmmem(self) -> dict[str, int] | None:
        """Kamailio's shared memory counters (`kamcmd core.shmmem`), None if unavailable."""
        if not self.ctl:
            return None
        try:
            out = subprocess.run(["kamcmd", "-s", self.ctl, "core.shmmem"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        vals = dict(re.findall(r"(\w+):\s*(\d+)", out))
        return {k: int(v) for k, v in vals.items()} or None

    def counters(self) -> dict[str, int]:
        """Counters the system exposes (the daemon's); {} where there are none."""
        return {}

    def crash_report(self) -> str:
        """A process of the system died (e.g. Kamailio's "child process N exited by a
        signal"): what its log says, else ""."""
        dead = [p.name for p in self.procs.values() if not p.alive()]
        lines = []
        for proc in self.procs.values():
            try:
                text = proc.log.read_text(errors="replace")
            except OSError:
                continue
            lines += [f"{proc.name}: {line.strip()}" for line in text.splitlines()
                      if "exited by a signal" in line or "Segmentation fault" in line]
        if dead and not lines:
            lines = [f"{name} exited" for name in dead]
        return "; ".join(lines[:3])

    # lifecycle
    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
            self._wait_tls()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def _wait_tls(self, timeout: float = 30.0) -> None:
        last: list[str] = [""]

        def answers() -> bool:
            for proc in self.procs.values():
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
            try:
                head = tls_options(self.tls_port, self.s.certs["ca"])
            except (OSError, ssl.SSLError) as exc:
                last[0] = str(exc)
                return False
            last[0] = head.splitlines()[0]
            if not head.startswith("SIP/2.0 200"):
                return False
            self.reply_head = head
            return True

        try:
            wait_until(answers, timeout, f"{self.name} to answer OPTIONS over TLS")
        except TimeoutError as exc:
            tails = "\n".join(f"--- {p.name}:\n{p.tail(20)}" for p in self.procs.values())
            raise RuntimeError(f"{exc} (last: {last[0]})\n{tails}") from None
        time.sleep(0.3)

    def _kamailio(self, cfg: Path, defines: dict[str, str], bridge_config: Path) -> Proc:
        self.ctl = f"unix:{self.workdir}/kamailio_ctl"
        sip_port = int(defines["SIP_PORT"])
        defines = {
            **defines,
            "CHILDREN": str(self.s.children),
            "KEMI_SCRIPT": f'"{self.script}"',
            "CTL_SOCKET": f'"{self.ctl}"',
        }
        argv = ["kamailio", "-f", str(cfg), "-DD", "-E", "-m", str(self.s.shm_mb)]
        for name, value in defines.items():
            argv += ["-A", f"{name}={value}"]
        argv += ["-Y", str(self.workdir), "-P", str(self.workdir / "kamailio.pid")]
        env = dict(os.environ, TLSBRIDGE_VENV=str(self.tree.venv),
                   TLSBRIDGE_CONFIG=str(bridge_config))
        proc = Proc("kamailio", argv, self.workdir / "kamailio.log", env=env, cpus=self.s.cpus)
        self.procs["kamailio"] = proc

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"kamailio exited during start-up:\n{proc.tail()}")
            return udp_ping(sip_port)

        wait_until(up, 40, "kamailio to answer OPTIONS over UDP")
        return proc

    def _dummy_bridge_config(self) -> Path:
        """A tlsbridge.toml for routing.py where no daemon runs (its hairpin is nobody's)."""
        path = self.workdir / "no-bridge.toml"
        path.write_text(f"""# bench: routing.py reads this; no daemon uses it
[daemon]
run_dir = "{self.workdir}/no-bridge"

[kamailio]
hairpin = "127.0.0.1:{free_port()}"
cfg_review = "warn"   # this Kamailio serves TLS another way: its cfg is no bridge's
""")
        return path


class TlsBridgeSystem(System):
    key = "tlsbridge"
    engine = "openssl"

    def _start(self) -> None:
        sip, hairpin, self.tls_port = (free_port(udp_too=True), free_port(), free_port())
        toml = self.workdir / "tlsbridge.toml"
        workers = f"workers = {self.s.workers}\n" if self.s.workers > 1 else ""
        toml.write_text(f"""# bench: the daemon under test
[daemon]
run_dir = "{self.workdir}/run"
log_level = "{self.s.daemon_log_level}"
handshake_timeout = 10.0
{workers}
[kamailio]
hairpin = "127.0.0.1:{hairpin}"
proxy_protocol = 1
source_ip = "127.0.0.1"
connect_timeout = 5.0

[[listener]]
address = "127.0.0.1:{self.tls_port}"
profile = "default"

[profile.default]
certificate = "{self.s.certs['cert']}"
private_key = "{self.s.certs['key']}"
verify_client = "off"
min_version = "TLSv1.2"
max_version = "TLSv1.3"
engine = "{self.engine}"
""")
        self._kamailio(self.tree.kamailio_cfg, {
            "SIP_PORT": str(sip), "HAIRPIN_PORT": str(hairpin), "TLS_PORT": str(self.tls_port),
        }, toml)
        self.toml = toml
        argv = [str(self.tree.python), "-m", "tlsbridge.daemon.cli", "run", "-c", str(toml)]
        self.procs["daemon"] = Proc("daemon", argv, self.workdir / "tlsbridge.log",
                                    cpus=self.s.cpus)

    def counters(self) -> dict[str, int]:
        from tlsbridge.shared.client import ControlClient
        from tlsbridge.shared.settings import load_settings

        client = ControlClient(load_settings(self.toml).control_endpoint, timeout_ms=2000)
        try:
            return dict(client.request("stats")["counters"])
        except Exception:  # a bench must not fail for want of a counter
            return {}
        finally:
            client.close()


class TlsBridgeOneWorkerSystem(TlsBridgeSystem):
    """The scaling baseline of a `--workers N` run: the same daemon with one worker."""

    key = "tlsbridge-1w"

    def _start(self) -> None:
        self.s = replace(self.s, workers=1)
        super()._start()


class TlsBridgePyOpenSSLSystem(TlsBridgeSystem):
    key = "tlsbridge-pyopenssl"
    engine = "pyopenssl"


class TlsBridgeGnuTLSSystem(TlsBridgeSystem):
    key = "tlsbridge-gnutls"
    engine = "gnutls"


class HAProxySystem(System):
    key = "haproxy"

    def _start(self) -> None:
        sip, backend, self.tls_port = (free_port(udp_too=True), free_port(), free_port())
        self._kamailio(self.tree.kamailio_cfg, {
            "SIP_PORT": str(sip), "HAIRPIN_PORT": str(backend), "TLS_PORT": str(self.tls_port),
        }, self._dummy_bridge_config())
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(f"""# bench: HAProxy terminating TLS in front of Kamailio (PROXY v1)
global
    nbthread {self.s.workers}
    maxconn 9600
    # no log, no stats socket: nothing but the relay

defaults
    mode tcp
    maxconn 9600
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend sip_tls
    bind 127.0.0.1:{self.tls_port} ssl crt {self.s.certs['combined']}
    default_backend kamailio

backend kamailio
    server k1 127.0.0.1:{backend} send-proxy
""")
        self.procs["haproxy"] = Proc("haproxy", ["haproxy", "-f", str(cfg), "-db"],
                                     self.workdir / "haproxy.log", cpus=self.s.cpus)


class KamailioTlsSystem(System):
    key = "kamailio"

    def _start(self) -> None:
        sip, self.tls_port = free_port(udp_too=True), free_port()
        tls_cfg = self.workdir / "tls.cfg"
        tls_cfg.write_text(f"""# bench: Kamailio's own TLS
[server:default]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
certificate = {self.s.certs['cert']}
private_key = {self.s.certs['key']}

[client:default]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
""")
        self._kamailio(BENCH_KAM / "kamailio-tls.cfg", {
            "SIP_PORT": str(sip), "TLS_PORT": str(self.tls_port), "TLS_CFG": f'"{tls_cfg}"',
        }, self._dummy_bridge_config())


SYSTEMS: dict[str, type[System]] = {
    cls.key: cls
    for cls in (HAProxySystem, TlsBridgeSystem, KamailioTlsSystem, TlsBridgePyOpenSSLSystem,
                TlsBridgeGnuTLSSystem, TlsBridgeOneWorkerSystem)
}


def make_system(key: str, settings: Settings, workdir: Path, trees: dict[str, Tree]) -> System:
    """The system a key names (names.py); `trees` has the revisions' code by short id."""
    base, rev, config = parse_key(key)
    return SYSTEMS[base](settings, workdir, config, trees[rev] if rev else CURRENT)


@contextlib.contextmanager
def running(system: System):  # type: ignore[no-untyped-def]
    system.start()
    try:
        yield system
    finally:
        system.stop()
