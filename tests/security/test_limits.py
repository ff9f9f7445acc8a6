"""Configurable limits and the open-files limit: a refused connection is closed at once with a
tls.failed event that says why; the connections already there are untouched."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.lab import (
    BoundTlsUA,
    Lab,
    daemon_healthy,
    echo,
    lab_stack,
    open_fds,
    wait_until,
)
from tests.support.sip import TlsUA
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration]


def refused_at_once(lab: Lab, reason: str, source: str = "127.0.0.1") -> None:
    """A plain TCP connection is closed within a second, with tls.failed `reason`."""
    s = socket.create_connection(lab.tls_addr, timeout=5, source_address=(source, 0))
    peer = format_addr(*s.getsockname()[:2])
    started = time.monotonic()
    try:
        s.settimeout(2)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    except TimeoutError:
        raise AssertionError(f"connection {len(lab.daemon.request('list')['conns']) + 1} from "
                             f"{source} was accepted, not refused ({reason})") from None
    finally:
        s.close()
    assert time.monotonic() - started < 1.0, "the refused connection was not closed at once"
    failed = lab.events.wait_for(
        lambda e: e.type == ev.TLS_FAILED and e.conn is not None and e.conn.peer == peer)
    assert failed.reason == reason, failed.fields
    # A TLS client is refused the same way: its handshake fails.
    try:
        BoundTlsUA(*lab.tls_addr, ca=lab.ca, source=source).close()
    except (ssl.SSLError, OSError):
        pass
    else:
        raise AssertionError(f"a TLS connection from {source} was accepted beyond the limit")


def all_work(lab: Lab, uas: list[TlsUA]) -> None:
    for ua in uas:
        echo(ua, lab, 8192)
        reply = lab.options(ua)
        assert reply.status == 200
        assert lab.x_tls(reply).get("peer") == format_addr(*ua.local)


@pytest.mark.parametrize("workers", [1, 2])
def test_max_connections(tmp_path: Path, fault_certs: dict[str, Path], workers: int) -> None:
    """The limit is the daemon's, however many worker processes share the listener."""
    with lab_stack(tmp_path, fault_certs, extra="\n[limits]\nmax_connections = 3\n",
                   workers=workers) as lab:
        uas = [lab.ua() for _ in range(3)]
        try:
            all_work(lab, uas)
            for _ in range(5):  # SO_REUSEPORT spreads these over the workers
                refused_at_once(lab, "too_many_connections")
            all_work(lab, uas)  # the three are untouched
            stats = daemon_healthy(lab)
            assert stats["open"] == 3
            # One leaves: there is room for one more, and only one.
            uas.pop().close()
            wait_until(lambda: lab.daemon.request("stats")["open"] == 2, 5, "the close")
            uas.append(lab.ua())
            all_work(lab, uas)
            refused_at_once(lab, "too_many_connections")
        finally:
            for ua in uas:
                ua.close()
        assert daemon_healthy(lab)["counters"].get("tls.failed.too_many_connections", 0) >= 2


@pytest.mark.parametrize("workers", [1, 2])
def test_max_per_ip(tmp_path: Path, fault_certs: dict[str, Path], workers: int) -> None:
    with lab_stack(tmp_path, fault_certs, extra="\n[limits]\nmax_per_ip = 2\n",
                   workers=workers) as lab:
        uas: list[TlsUA] = [lab.ua() for _ in range(2)]
        try:
            all_work(lab, uas)
            for _ in range(5):
                refused_at_once(lab, "too_many_from_ip")
            # Another address is not affected by 127.0.0.1's count.
            other = [BoundTlsUA(*lab.tls_addr, ca=lab.ca, source="127.0.0.2") for _ in range(2)]
            uas += other
            all_work(lab, uas)
            assert all(lab.x_tls(lab.options(ua))["peer"].startswith("127.0.0.2:")
                       for ua in other)
            refused_at_once(lab, "too_many_from_ip", source="127.0.0.2")
            all_work(lab, uas)
        finally:
            for ua in uas:
                ua.close()
        daemon_healthy(lab)


NOFILE = 160


def test_open_files_limit_caps_connections(tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    """The daemon runs with `ulimit -n 160` and max_connections far above it: a flood beyond
    what its descriptors allow is refused with events, never by a failing accept()."""
    with lab_stack(tmp_path, fault_certs, extra="\n[limits]\nmax_connections = 100000\n",
                   daemon_prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"]) as lab:
        limit = int(Path(f"/proc/{lab.daemon.pid}/limits").read_text().split(
            "Max open files")[1].split()[0])
        assert limit == NOFILE

        def attempt(_: int) -> TlsUA | str:
            try:
                ua = lab.ua(timeout=10)
            except (ssl.SSLError, OSError) as exc:
                return repr(exc)
            return ua

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(NOFILE)))
        uas = [r for r in results if isinstance(r, TlsUA)]
        refusals = [r for r in results if isinstance(r, str)]
        try:
            assert uas and refusals, (len(uas), refusals[:3])
            assert len(uas) <= NOFILE // 2
            all_work(lab, uas)
            assert open_fds(lab.daemon.pid) < NOFILE
            wait_until(lambda: len(lab.events_for(
                lambda e: e.type == ev.TLS_FAILED and e.reason == "too_many_connections"))
                >= len(refusals), 10, "a tls.failed for each refusal")
            # Refused connections were accepted and closed at once (no backlog left hanging).
            refused_at_once(lab, "too_many_connections")
        finally:
            for ua in uas:
                ua.close()
        wait_until(lambda: lab.daemon.request("stats")["open"] == 0, 10, "connections to close")
        ua = lab.ua()
        try:
            all_work(lab, [ua])
        finally:
            ua.close()
        daemon_healthy(lab)
        log = lab.daemon.log.read_text(errors="replace")
        assert "Too many open files" not in log and "EMFILE" not in log, log[-2000:]
