"""Processes the bench starts, and what it reads of them in /proc.

Every process is started in a session of its own, so "all processes of a system under test" is
"every process whose session id is one of its leaders' PIDs" (Kamailio's children, a daemon's
workers), and stopping one kills its whole session by PID. Every started process is
registered, and `stop_all` (atexit, and the signal handlers run.py installs) stops what is left.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIVE: list[Proc] = []


def raise_nofile() -> int:
    """Raise this process's open-files limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1", udp_too: bool = False) -> int:
    """A port free now for TCP (and UDP when asked), picked at random *below* the ephemeral
    range: a port the kernel hands out to outgoing connections could be taken by anyone's
    connect() between this check and the server's bind (it happened under load)."""
    low, _ = _ephemeral_range()
    top = low - 1 if low > 12000 else 65535
    for _ in range(200):
        port = random.randint(10000, top)
        kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp_too else [])
        try:
            for kind in kinds:
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def run() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return run


class Proc:
    """A child in its own session; `stop()` ends the session by PID, whatever happens."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> None:
        self.name, self.argv, self.log = name, argv, log
        self._logf = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else self._logf,
            stderr=self._logf,
            env=env if env is not None else dict(os.environ),
            start_new_session=True,
            preexec_fn=_preexec(cpus),
        )
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 8.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Children (Kamailio's, a daemon's workers) share the session: none may outlive it.
        for pid in session_pids([self.pid]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        for f in (self.popen.stdin, self.popen.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._logf.close()
        if self in _LIVE:
            _LIVE.remove(self)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def stop_all() -> None:
    for proc in reversed(list(_LIVE)):
        with contextlib.suppress(Exception):
            proc.stop(timeout=3.0)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


# -- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def session_pids(leaders: Iterable[int]) -> list[int]:
    """Every live process whose session id is one of `leaders`."""
    want = set(leaders)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[0] is field 3 (state); session is field 6
        if fields and int(fields[3]) in want and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def cpu_user_sys(pids: Iterable[int]) -> tuple[float, float]:
    """utime and stime of these processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            user += int(fields[11])  # field 14
            system += int(fields[12])  # field 15
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    return sum(cpu_user_sys(pids))


def ctx_switches(pids: Iterable[int]) -> int:
    """Voluntary + involuntary context switches of these processes, all their threads."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[-1])
    return total


def pss_kib(pids: Iterable[int]) -> int:
    """Sum of the proportional set sizes (KiB) from /proc/PID/smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def time_wait_count() -> int:
    """TCP sockets in TIME_WAIT (IPv4 and IPv6)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                n += sum(1 for line in f if line.split(None, 4)[3] == "06")
        except OSError:
            continue
    return n
