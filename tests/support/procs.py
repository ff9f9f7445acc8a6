"""Start and stop the real Kamailio and the real daemon for integration tests, on free ports."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq

from tests.support.requirements import kamailio as kamailio_binary
from tests.support.requirements import kamcmd as kamcmd_binary
from tests.support.sip import UdpUA
from tlsbridge.shared.client import ControlClient
from tlsbridge.shared.control import ControlError
from tlsbridge.shared.events import Event, decode_event

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "kamailio-cfg"


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_issued: set[int] = set()


def free_tcp_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP (Kamailio binds both for some listeners), never one
    this test run handed out before (it may not be bound yet)."""
    # Below the kernel's ephemeral range: client sockets (ours, Kamailio's, a benchmark's)
    # cannot take it between our check and the server's bind.
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(500):
        port = random.randrange(10000, max(10001, low))
        if port in _issued:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind((host, port))
                u.bind((host, port))
            _issued.add(port)
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


class Proc:
    """A child process in its own session, stopped by PID (and its group) even on failure."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        self._logf = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            argv, stdout=self._logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Kamailio's children share the session we created; make sure none outlive the test.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(5)
        self._logf.close()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def with_listener_aliases(workdir: Path, bridge_config: Path, tls_port: int) -> Path:
    """The reference kamailio.cfg names the daemon's one TLS address (alias=tls:..:TLS_PORT).
    For a daemon with more listeners, a cfg in `workdir` adds an alias for each of the others
    and includes the reference one: Kamailio's start-up review (kemi check_kamailio) refuses
    a listener that is not one of its own addresses."""
    import tomllib

    listeners = tomllib.loads(bridge_config.read_text()).get("listener", [])
    extra = [lst.get("advertise") or lst["address"] for lst in listeners]
    extra = [a for a in extra if not a.endswith(f":{tls_port}")]
    if not extra:
        return CFG / "kamailio.cfg"
    cfg = workdir / "kamailio-aliases.cfg"
    cfg.write_text("#!KAMAILIO\n" + "".join(f"alias=tls:{a}\n" for a in extra)
                   + f'include_file "{CFG / "kamailio.cfg"}"\n')
    return cfg


class Kamailio(Proc):
    def __init__(
        self, workdir: Path, *, sip_port: int, hairpin_port: int, tls_port: int,
        bridge_config: Path, script: Path = CFG / "routing.py", children: int = 2,
        extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
        venv: str = sys.prefix, prefix: Sequence[str] = (),
    ) -> None:
        self.sip_port, self.hairpin_port = sip_port, hairpin_port
        self.ctl = f"unix:{workdir}/kamailio_ctl"
        cfg = with_listener_aliases(workdir, bridge_config, tls_port)
        argv = [
            *prefix, kamailio_binary(), "-f", str(cfg), "-DD", "-E",
            "-A", f"SIP_PORT={sip_port}", "-A", f"HAIRPIN_PORT={hairpin_port}",
            "-A", f"TLS_PORT={tls_port}", "-A", f"CHILDREN={children}",
            "-A", f'KEMI_SCRIPT="{script}"', "-A", f'CTL_SOCKET="{self.ctl}"',
            "-Y", str(workdir), "-P", str(workdir / "kamailio.pid"), *extra_args,
        ]
        full_env = dict(os.environ, TLSBRIDGE_VENV=venv,
                        TLSBRIDGE_CONFIG=str(bridge_config), **(env or {}))
        super().__init__("kamailio", argv, workdir / "kamailio.log", full_env)

    def wait_ready(self, timeout: float = 20.0) -> None:
        from tests.support.sip import build_request

        ua = UdpUA()
        try:
            def answers() -> bool:
                if not self.alive():
                    raise RuntimeError(f"kamailio exited:\n{self.tail()}")
                target = ("127.0.0.1", self.sip_port)
                ua.send(build_request("OPTIONS", f"sip:127.0.0.1:{self.sip_port}",
                                      via_proto="UDP", local=ua.local), target)
                try:
                    return ua.read(0.3).status == 200
                except OSError:
                    return False
            wait_until(answers, timeout, "kamailio to answer OPTIONS")
        finally:
            ua.close()

    def wait_ready_registrar(self, timeout: float = 20.0) -> None:
        """For scripts that do not answer OPTIONS: a REGISTER gets a final reply."""
        from tests.support.ua import SipUA

        ua = SipUA("probe", domain="localhost", proxy=("127.0.0.1", self.sip_port), udp=UdpUA())

        def answers() -> bool:
            if not self.alive():
                raise RuntimeError(f"kamailio exited:\n{self.tail()}")
            try:
                return ua.register().status == 200
            except (OSError, AssertionError):
                return False
        try:
            wait_until(answers, timeout, "kamailio to answer REGISTER")
        finally:
            ua.close()

    # An exception the routing script or the bridge let escape into Kamailio is a bug
    # whatever a test asserted: it fails the test that stops this Kamailio.
    PYTHON_ERRORS = ("Unhandled exception in the Python code",)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        try:
            log = self.log.read_text(errors="replace")
        except OSError:
            return
        bad = [m for m in self.PYTHON_ERRORS if m in log]
        if bad:
            at = log.index(bad[0])
            raise AssertionError(f"Kamailio ({self.log}) logged {bad[0]!r}:\n"
                                 f"{log[max(0, at - 200):at + 1500]}")

    def kamcmd(self, *args: str) -> str:
        out = subprocess.run([kamcmd_binary(), "-s", self.ctl, *args], capture_output=True,
                             text=True, timeout=10)
        return out.stdout + out.stderr


def write_bridge_config(
    path: Path, *, tls_port: int, hairpin_port: int, sip_port: int, certs: dict[str, Path],
    run_dir: Path, extra: str = "", handshake_timeout: float = 5.0, engine: str = "openssl",
    listener_extra: str = "", workers: int = 1, daemon_extra: str = "",
    kamailio_extra: str = "",
) -> Path:
    path.write_text(f"""
[daemon]
workers = {workers}
{daemon_extra}
run_dir = "{run_dir}"
log_level = "debug"
handshake_timeout = {handshake_timeout}

[kamailio]
{kamailio_extra}
hairpin = "127.0.0.1:{hairpin_port}"
connect_timeout = 2.0
sip_address = "127.0.0.1:{sip_port}"

[[listener]]
address = "127.0.0.1:{tls_port}"
profile = "default"
{listener_extra}

[profile.default]
certificate = "{certs['cert']}"
private_key = "{certs['key']}"
ca_list = "{certs['ca']}"
engine = "{engine}"
{extra}
""")
    return path


class Daemon(Proc):
    def __init__(self, workdir: Path, config: Path, python: str = sys.executable,
                 prefix: Sequence[str] = ()) -> None:
        from tlsbridge.shared.settings import load_settings

        self.config = config
        self.settings = load_settings(config)
        argv = [*prefix, python, "-m", "tlsbridge.daemon.cli", "run", "-c", str(config)]
        super().__init__("tlsbridge", argv, workdir / "tlsbridge.log", dict(os.environ))
        self.client = ControlClient(self.settings.control_endpoint, timeout_ms=1000)

    def request(self, op: str, **args: object) -> dict:
        return self.client.request(op, **args)

    def wait_ready(self, timeout: float = 15.0) -> None:
        def answers() -> bool:
            if not self.alive():
                raise RuntimeError(f"tlsbridge exited:\n{self.tail()}")
            try:
                return bool(self.client.request("ping", timeout_ms=300).get("pong"))
            except ControlError:
                return False
        wait_until(answers, timeout, "tlsbridge to answer ping")

    def wait_subscribed(self, prefix: str = "outbound.", timeout: float = 15.0) -> None:
        """Until someone subscribes to `prefix` (Kamailio's rtimer does to outbound.): an
        outcome published before would never reach it."""
        wait_until(lambda: prefix in self.request("stats").get("subscriptions", []), timeout,
                   f"a subscriber of {prefix} (Kamailio's rtimer)")

    def stop(self, timeout: float = 10.0) -> None:
        self.client.close()
        super().stop(timeout)


class EventTap:
    """Subscribes to the daemon's events and keeps them, for assertions."""

    def __init__(self, endpoint: str) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        # ZeroMQ's slow joiner: events published before the subscription reaches the daemon
        # are not ours. The daemon greets each new subscriber of daemon.started with one: once
        # it is here, so is the subscription.
        try:
            self.wait_for(lambda e: e.type == "daemon.started", timeout=10)
        except BaseException:
            self.close()
            raise

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(50):
                event = decode_event(self._sock.recv_multipart())
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        self._sock.close(linger=0)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 5.0) -> Event:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = end - time.monotonic()
                if left <= 0:
                    types = [(e.type, e.conn.id if e.conn else None) for e in self.events]
                    raise TimeoutError(f"no matching event; saw {types}")
                self._cond.wait(left)

    def of(self, type_: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.type == type_]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
