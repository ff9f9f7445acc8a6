"""What an operator touches: the CLI against a running daemon, and the metrics endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.support.procs import free_tcp_udp_port
from tests.support.sip import TlsUA
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[Stack]:
    port = free_tcp_udp_port()
    s = start_stack(tmp_path_factory.mktemp("ops"), certs,
                    extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    s.metrics_port = port  # type: ignore[attr-defined]
    yield s
    stop_stack(s)


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsbridge.daemon.cli", *args, "-c",
                           str(stack.daemon.config)], capture_output=True, text=True, timeout=30)


def test_status_lookup_kill(ops: Stack) -> None:
    ua = TlsUA(*ops.tls_addr, ca=ops.ca)
    try:
        assert ua.request("OPTIONS", f"sip:127.0.0.1:{ops.tls_port}").status == 200
        peer = format_addr(*ua.local)
        status = cli(ops, "status")
        assert status.returncode == 0 and peer in status.stdout and "TLSv1.3" in status.stdout
        listed = json.loads(cli(ops, "status", "--json").stdout)
        conn_id = next(c["conn"]["id"] for c in listed if c["conn"]["peer"] == peer)
        looked = json.loads(cli(ops, "lookup", "--peer", peer).stdout)
        assert looked["tls"]["sni"] == "localhost" and looked["conn"]["id"] == conn_id
        killed = cli(ops, "kill", str(conn_id))
        assert killed.returncode == 0
        ua.sock.settimeout(5)
        assert ua.sock.recv(100) == b""  # close_notify
        ops.events.wait_for(lambda e: e.type == "conn.closed" and e.conn.id == conn_id
                            and e.reason == "killed")
    finally:
        ua.close()


def test_errors_say_what_to_fix(ops: Stack) -> None:
    out = cli(ops, "kill", "999999")
    assert out.returncode == 1 and "not_found" in out.stderr
    out = subprocess.run([sys.executable, "-m", "tlsbridge.daemon.cli", "check", "-c",
                          "/nonexistent.toml"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "/nonexistent.toml" in out.stderr


def test_events_cli_catches_a_connection(ops: Stack) -> None:
    tail = subprocess.Popen([sys.executable, "-m", "tlsbridge.daemon.cli", "events", "--json",
                             "--duration", "4", "-c", str(ops.daemon.config)],
                            stdout=subprocess.PIPE, text=True)
    try:
        # Subscribed once the daemon's greeting (daemon.started) is printed.
        assert tail.stdout is not None
        first = tail.stdout.readline()
        assert json.loads(first)["type"] == "daemon.started", first
        ua = TlsUA(*ops.tls_addr, ca=ops.ca)
        peer = format_addr(*ua.local)
        ua.close()
        out, _ = tail.communicate(timeout=15)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    types = [json.loads(line)["type"] for line in out.splitlines()
             if json.loads(line).get("conn") and json.loads(line)["conn"]["peer"] == peer]
    assert "tls.established" in types and "conn.closed" in types


def test_metrics(ops: Stack) -> None:
    ua = TlsUA(*ops.tls_addr, ca=ops.ca)
    ua.close()
    url = f"http://127.0.0.1:{ops.metrics_port}/metrics"  # type: ignore[attr-defined]
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    handshakes = next(line for line in body.splitlines()
                      if line.startswith("tlsbridge_handshakes_total"))
    assert float(handshakes.split()[-1]) >= 1
    assert 'tlsbridge_connections_open{direction="in"}' in body
    assert "tlsbridge_certificate_expiry_seconds{" in body


def test_engines_command() -> None:
    out = subprocess.run([sys.executable, "-m", "tlsbridge.daemon.cli", "engines"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "openssl    available" in out.stdout
