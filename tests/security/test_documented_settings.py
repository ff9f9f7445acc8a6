"""Settings the docs promise, against the running daemon: metrics listen on loopback unless
`allow_remote = true` (docs/security.md); `private_key_password_file` unlocks an encrypted key
(README, Configuration), and a wrong one refuses start-up naming the file, not the password."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.faults.lab import lab_config, lab_stack
from tests.security.test_defaults import PASSWORD, WRONG, encrypted_key
from tests.support.procs import free_tcp_udp_port

pytestmark = [pytest.mark.integration]


def cli(*args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """`tlsbridge ARGS`; a `run` that wrongly starts is killed by the timeout (and fails)."""
    return subprocess.run([sys.executable, "-m", "tlsbridge.daemon.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def listening(port: int) -> list[str]:
    """The local addresses of TCP sockets listening on `port` (ss)."""
    out = subprocess.run(["ss", "-tlnH", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def with_metrics(config: Path, section: str) -> Path:
    config.write_text(config.read_text() + f"\n[metrics]\n{section}\n")
    return config


def test_metrics_refuse_a_remote_address_without_allow_remote(
        tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    port = free_tcp_udp_port()
    config = with_metrics(lab_config(tmp_path, fault_certs), f'listen = "0.0.0.0:{port}"')
    checked = cli("check", "-c", str(config))
    assert checked.returncode != 0, checked.stdout
    refusal = [ln for ln in (checked.stdout + checked.stderr).splitlines()
               if "metrics" in ln and "listen" in ln and "allow_remote" in ln]
    assert refusal, f"check did not refuse the metrics address:\n{checked.stdout}"
    started = cli("run", "-c", str(config))
    assert started.returncode != 0
    assert "metrics" in started.stderr and "allow_remote" in started.stderr, started.stderr
    assert listening(port) == []


def test_metrics_on_loopback_are_served_there_only(
        tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    port = free_tcp_udp_port()
    config = with_metrics(lab_config(tmp_path, fault_certs), f'listen = "127.0.0.1:{port}"')
    with lab_stack(tmp_path, fault_certs, config=config, with_kamailio=False):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            assert b"tlsbridge_" in r.read()
        assert listening(port) == [f"127.0.0.1:{port}"]


def test_metrics_with_allow_remote_listen_where_asked(
        tmp_path: Path, fault_certs: dict[str, Path]) -> None:
    """The only test that binds a wildcard address; it is reached over loopback only."""
    port = free_tcp_udp_port()
    config = with_metrics(lab_config(tmp_path, fault_certs),
                          f'listen = "0.0.0.0:{port}"\nallow_remote = true')
    checked = cli("check", "-c", str(config))  # (it also reports no Kamailio: none runs here)
    errors = [ln for ln in checked.stdout.splitlines() if ln.startswith("error")]
    assert not [ln for ln in errors if "metrics" in ln], errors
    with lab_stack(tmp_path, fault_certs, config=config, with_kamailio=False):
        assert listening(port) == [f"0.0.0.0:{port}"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200


def test_private_key_password_file_unlocks_the_key(tmp_path: Path) -> None:
    certs = encrypted_key(tmp_path)
    password = tmp_path / "key.pass"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    config = lab_config(tmp_path, certs, extra=f'private_key_password_file = "{password}"')
    with lab_stack(tmp_path, certs, config=config, with_kamailio=False) as lab:
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        # The handshake needs the key: it was unlocked with the password from the file.
        with socket.create_connection(lab.tls_addr, timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.getpeercert()["subjectAltName"][0] == ("DNS", "localhost")
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # The wrong password in the file: start-up refused, naming the file, never the password.
    password.write_text(WRONG + "\n")
    refused = cli("run", "-c", str(config))
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert str(certs["key"]) in out or str(password) in out, out
    assert PASSWORD not in out and WRONG not in out
    # No such file: refused, naming the key.
    password.unlink()
    missing = cli("check", "-c", str(config))
    assert missing.returncode != 0
    assert "private_key_password_file" in missing.stdout + missing.stderr
