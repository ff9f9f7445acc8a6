"""Helpers for the fault and security tests: a stack with knobs the integration one lacks, raw TLS
clients, SIP MESSAGE echo checks, process memory.

Everything here starts real processes (the daemon, Kamailio) on free loopback ports and stops
them by PID; tests use `lab_stack()` as a context manager so they are stopped even on failure.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import re
import resource
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from tests.integration.conftest import Stack
from tests.support.procs import (
    Daemon,
    EventTap,
    Kamailio,
    Proc,
    free_tcp_udp_port,
    wait_until,
    write_bridge_config,
)
from tests.support.sip import SipMessage, StreamFramer, TlsUA, build_request, parse_message
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.client import ControlClient
from tlsbridge.shared.events import Event

HERE = Path(__file__).resolve().parent
FAULTS_SCRIPT = HERE / "kemi_faults.py"
PY = sys.executable

X_TLS = re.compile(
    r"^(?P<version>\S+); (?P<cipher>\S+); sni=(?P<sni>\S+); peer=(?P<peer>\S+); "
    r"verified=(?P<verified>[01])$"
)


# -- certificates ---------------------------------------------------------------------------


def make_certs(d: Path) -> dict[str, Path]:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    d.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(d / "ca.pem")
    server.cert_chain_pems[0].write_to_path(d / "server.pem")
    server.private_key_pem.write_to_path(d / "server.key")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


# -- processes ------------------------------------------------------------------------------


class LabDaemon(Daemon):
    """The daemon, optionally under a wrapper (`prlimit ...`) and with extra environment."""

    def __init__(self, workdir: Path, config: Path, *, prefix: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        from tlsbridge.shared.settings import load_settings

        self.config = config
        self.settings = load_settings(config)
        argv = [*(prefix or []), PY, "-m", "tlsbridge.daemon.cli", "run", "-c", str(config)]
        Proc.__init__(self, "tlsbridge", argv, workdir / "tlsbridge.log",
                      dict(os.environ, **(env or {})))
        self.client = ControlClient(self.settings.control_endpoint, timeout_ms=2000)


class LabKamailio(Kamailio):
    """Kamailio on the reference kamailio.cfg (as tests/support/procs.Kamailio runs it), plus
    cfg_rpc so that a test can raise its TCP read buffer: the default tcp_rd_buf_size drops any
    SIP message over ~16 KiB ("tcp_read(): buffer overrun")."""

    READ_BUFFER = 72 * 1024  # a 64 KiB body and its headers; allocated per connection in shm
    SHM_MB = 256  # 1000 connections x READ_BUFFER, and the rest

    def __init__(self, workdir: Path, *, sip_port: int, hairpin_port: int, tls_port: int,
                 bridge_config: Path, script: Path, env: dict[str, str],
                 children: int = 2) -> None:
        super().__init__(workdir, sip_port=sip_port, hairpin_port=hairpin_port,
                         tls_port=tls_port, bridge_config=bridge_config, script=script,
                         children=children, env=env,
                         extra_args=("--loadmodule=cfg_rpc.so", "-m", str(self.SHM_MB)))

    def raise_read_buffer(self) -> None:
        out = self.kamcmd("cfg.set_now_int", "tcp", "rd_buf_size", str(self.READ_BUFFER))
        assert "error" not in out.lower(), out
        got = self.kamcmd("cfg.get", "tcp", "rd_buf_size").strip()
        assert got == str(self.READ_BUFFER), got

    def signal_all(self, sig: int) -> None:
        """Kamailio and all its children (they share the session Proc started)."""
        os.killpg(self.pid, sig)


@dataclass
class Lab(Stack):
    workdir: Path = Path()
    config: Path = Path()
    script: Path = FAULTS_SCRIPT
    kamailio_env: dict[str, str] = field(default_factory=dict)
    kamailios: list[Kamailio] = field(default_factory=list)

    # -- Kamailio's life --------------------------------------------------------------------

    def start_kamailio(self) -> Kamailio:
        kam = LabKamailio(self.workdir, sip_port=self.sip_port, hairpin_port=self.hairpin_port,
                          tls_port=self.tls_port, bridge_config=self.config, script=self.script,
                          env=self.kamailio_env)
        self.kamailios.append(kam)
        self.kamailio = kam
        kam.wait_ready()
        kam.raise_read_buffer()
        if not self.kamailio_env.get("TLSB_FAULTS_NO_EVENTS"):
            self.daemon.wait_subscribed()  # its rtimer, as in tests/integration/conftest.py
        return kam

    def stop_kamailio(self) -> None:
        if self.kamailio is not None:
            self.kamailio.stop()
            self.kamailio = None

    # -- clients ----------------------------------------------------------------------------

    def ua(self, **kw: object) -> TlsUA:
        return TlsUA(*self.tls_addr, ca=self.ca, **kw)  # type: ignore[arg-type]

    def options(self, ua: TlsUA, user: str | None = None) -> SipMessage:
        ruri = f"sip:{user + '@' if user else ''}127.0.0.1:{self.tls_port}"
        return ua.request("OPTIONS", ruri)

    def x_tls(self, reply: SipMessage) -> dict[str, str]:
        m = X_TLS.match(reply.get("X-TLS"))
        return m.groupdict() if m else {}

    def logs(self) -> str:
        out = []
        for proc in (self.daemon, *self.kamailios):
            out.append(f"--- {proc.name} (pid {proc.pid}) log ---\n{proc.tail(80)}")
        return "\n".join(out)

    def events_for(self, pred: Callable[[Event], bool]) -> list[Event]:
        with self.events._cond:
            return [e for e in self.events.events if pred(e)]


def lab_config(workdir: Path, certs: dict[str, Path], *, daemon_extra: str = "",
               extra: str = "", handshake_timeout: float = 5.0, engine: str = "openssl",
               run_dir: Path | None = None, ports: tuple[int, int, int] | None = None,
               workers: int = 1) -> Path:
    tls_port, sip_port, hairpin_port = ports or tuple(free_tcp_udp_port() for _ in range(3))
    config = write_bridge_config(
        workdir / "tlsbridge.toml", tls_port=tls_port, hairpin_port=hairpin_port,
        sip_port=sip_port, certs=certs, run_dir=run_dir or workdir, extra=extra,
        handshake_timeout=handshake_timeout, engine=engine, workers=workers,
    )
    if daemon_extra:
        text = config.read_text().replace("[daemon]\n", f"[daemon]\n{daemon_extra.strip()}\n", 1)
        config.write_text(text)
    return config


def ports_of(config: Path) -> tuple[int, int, int]:
    """(tls, sip, hairpin) as written by lab_config."""
    text = config.read_text()
    tls = int(re.search(r'\[\[listener\]\]\s*address = "127\.0\.0\.1:(\d+)"', text).group(1))
    sip = int(re.search(r'sip_address = "127\.0\.0\.1:(\d+)"', text).group(1))
    hairpin = int(re.search(r'hairpin = "127\.0\.0\.1:(\d+)"', text).group(1))
    return tls, sip, hairpin


@contextlib.contextmanager
def lab_stack(workdir: Path, certs: dict[str, Path], *, with_kamailio: bool = True,
              script: Path = FAULTS_SCRIPT, kamailio_env: dict[str, str] | None = None,
              daemon_prefix: list[str] | None = None, daemon_env: dict[str, str] | None = None,
              config: Path | None = None, tap: bool = True,
              **config_kw: object) -> Iterator[Lab]:
    """The daemon (and Kamailio with the test script), stopped by PID however the test ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = config or lab_config(workdir, certs, **config_kw)  # type: ignore[arg-type]
    tls_port, sip_port, hairpin_port = ports_of(config)
    daemon = LabDaemon(workdir, config, prefix=daemon_prefix, env=daemon_env)
    lab = Lab(None, daemon, None, tls_port, sip_port, hairpin_port,  # type: ignore[arg-type]
              str(certs["ca"]), workdir=workdir, config=config, script=script,
              kamailio_env=dict(kamailio_env or {}))
    try:
        daemon.wait_ready()
        if tap:
            lab.events = EventTap(daemon.settings.events_endpoint)
        if with_kamailio:
            lab.start_kamailio()
        yield lab
    except (pytest.skip.Exception, pytest.xfail.Exception):
        raise
    except BaseException:
        print(lab.logs())
        raise
    finally:
        if lab.events is not None:
            lab.events.close()
        # Every process is stopped, even when one's stop reports a failure (Kamailio's log).
        failures: list[AssertionError] = []
        for proc in (*lab.kamailios, daemon):
            try:
                proc.stop()
            except AssertionError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


# -- resources ------------------------------------------------------------------------------


def run_for(seconds: float, stop: threading.Event,
            targets: list[Callable[[], object]]) -> None:
    """Run `targets` in threads for `seconds`, then set `stop` and wait for them (bounded)."""
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    try:
        stop.wait(seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def raise_nofile(want: int) -> int:
    """Raise this process's open-files limit (soft up to hard, hard too when root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard < want and os.geteuid() == 0:
        hard = want
    new = min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM from /proc/PID/status, Pss from smaps_rollup (KiB)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- SIP ------------------------------------------------------------------------------------


def random_body(size: int, rng: random.Random | None = None) -> bytes:
    """`size` random bytes as base64 text: Kamailio hands the body to Python as a str."""
    rng = rng or random.Random()
    raw = rng.randbytes(size * 3 // 4 + 3)
    return base64.b64encode(raw)[:size]


def message_request(local: tuple[str, int], ruri: str, body: bytes, *, call_id: str | None = None,
                    cseq: int = 1, extra: list[str] | None = None) -> bytes:
    return build_request("MESSAGE", ruri, via_proto="TLS", local=local, call_id=call_id,
                         cseq=cseq, extra=["Content-Type: text/plain", *(extra or [])], body=body)


def check_echo(reply: SipMessage, body: bytes) -> None:
    """The 200 of the echo script: Kamailio got `body` intact, and we got it back intact."""
    assert reply.status == 200, reply.first_line
    want = hashlib.sha256(body).hexdigest()
    assert reply.get("X-Body-SHA256") == want, (
        f"Kamailio received a different body: {reply.get('X-Body-Length')} bytes, "
        f"sha256 {reply.get('X-Body-SHA256')} != {want} ({len(body)} bytes sent)")
    got = hashlib.sha256(reply.body).hexdigest()
    assert got == want, f"echoed body differs: {len(reply.body)} bytes back, {len(body)} sent"


def echo(ua: TlsUA, lab: Lab, size: int = 4096, timeout: float = 10.0) -> None:
    body = random_body(size)
    call_id = uuid.uuid4().hex
    ua.send(message_request(ua.local, f"sip:echo@127.0.0.1:{lab.tls_port}", body,
                            call_id=call_id))
    reply = ua.read(timeout)
    assert reply.get("Call-ID") == call_id
    check_echo(reply, body)


class Bystander:
    """A well-behaved TLS UA, connected before a fault, that must keep working through it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ua = lab.ua()
        self.peer = format_addr(*self.ua.local)
        self.check(fresh=False)

    def check(self, *, fresh: bool = True, size: int = 16 * 1024) -> None:
        """Its connection still carries intact bodies both ways; a new connection works too."""
        echo(self.ua, self.lab, size)
        reply = self.lab.options(self.ua)
        assert reply.status == 200
        assert self.lab.x_tls(reply).get("peer") == self.peer, reply.get("X-TLS")
        if fresh:
            ua = self.lab.ua()
            try:
                reply = self.lab.options(ua)
                assert reply.status == 200
                assert self.lab.x_tls(reply).get("peer") == format_addr(*ua.local)
                echo(ua, self.lab, size)
            finally:
                ua.close()

    def close(self) -> None:
        self.ua.close()


class BoundTlsUA(TlsUA):
    """A TLS UA whose connection comes from a chosen local address (e.g. 127.0.0.2)."""

    def __init__(self, host: str, port: int, *, ca: str, source: str,
                 timeout: float = 5.0) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        raw = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        self.framer = StreamFramer()
        self.queue: list[bytes] = []
        self.timeout = timeout


def daemon_healthy(lab: Lab) -> dict:
    """The daemon process is the one we started, alive and answering; returns its stats."""
    assert lab.daemon.alive(), f"the daemon exited:\n{lab.daemon.tail()}"
    assert lab.daemon.request("ping")["pid"] == lab.daemon.pid
    return lab.daemon.request("stats")


# -- raw TLS --------------------------------------------------------------------------------


class RawTls:
    """A TLS client on memory BIOs over a plain socket: the test can also write raw bytes."""

    def __init__(self, addr: tuple[str, int], ca: str, *, version: ssl.TLSVersion | None = None,
                 timeout: float = 5.0, source: str | None = None) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        self.sock = socket.create_connection(addr, timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.framer = StreamFramer()
        self.queue: list[bytes] = []
        self.plaintext_in = 0  # bytes of plaintext read so far

    @property
    def local(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.do_handshake()
        return self.outgoing.read()

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(data)

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out:
            self.sock.sendall(out)

    flush = _flush

    def send(self, plaintext: bytes) -> None:
        self.obj.write(plaintext)
        self._flush()

    def raw_send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self, timeout: float = 5.0) -> SipMessage:
        end = time.monotonic() + timeout
        while not self.queue:
            try:
                try:
                    data = self.obj.read(65536)
                except ssl.SSLZeroReturnError:  # the peer's close_notify
                    data = b""
                if not data:
                    raise ConnectionError("TLS closed")
                self.plaintext_in += len(data)
                self.queue.extend(self.framer.feed(data))
                continue
            except ssl.SSLWantReadError:
                pass
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no SIP message")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("TCP closed")
            self.incoming.write(chunk)
        return parse_message(self.queue.pop(0))

    def read_raw_until_closed(self, timeout: float = 5.0) -> bytes:
        """Ciphertext bytes the server sends until it closes the TCP connection."""
        end = time.monotonic() + timeout
        got = b""
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"still open after {timeout} s (got {got[:64]!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def wait_closed_event(lab: Lab, peer: str, timeout: float = 10.0) -> Event:
    return lab.events.wait_for(
        lambda e: e.type == "conn.closed" and e.conn is not None and e.conn.peer == peer,
        timeout=timeout)


__all__ = ["wait_until"]
