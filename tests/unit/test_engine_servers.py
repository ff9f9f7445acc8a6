"""Every client engine against real TLS servers of other stacks: `openssl s_server` and
`gnutls-serv`, TLS 1.2 and 1.3 (the daemon's outbound side meets such peers)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support.requirements import engine_param, program
from tlsbridge.daemon.engines import registry
from tlsbridge.daemon.engines.base import TlsEngine
from tlsbridge.daemon.engines.registry import client_engine

# Every engine, loadable here or not: one that does not load fails (tests/conftest.py).
ENGINES = [engine_param(e) for e in registry.ENGINES]
TOOLS = {"openssl": "openssl", "gnutls": "gnutls-serv"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("servers")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf = ca.issue_cert("server.example.test")
    leaf.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    leaf.private_key_pem.write_to_path(str(d / "server.key"))
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    out = subprocess.run(["ss", "-tlnH", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return bool(out.strip())


@contextlib.contextmanager
def server(tool: str, certs: Path, version: str) -> Iterator[int]:
    program(TOOLS[tool], "openssl" if tool == "openssl" else "gnutls-bin")
    port = _free_port()
    if tool == "openssl":
        argv = ["openssl", "s_server", "-accept", str(port), "-cert", str(certs / "server.pem"),
                "-key", str(certs / "server.key"), "-quiet", "-naccept", "1",
                "-tls1_3" if version == "TLSv1.3" else "-tls1_2"]
    else:
        prio = "NORMAL:-VERS-ALL:+VERS-TLS1.3" if version == "TLSv1.3" else \
            "NORMAL:-VERS-ALL:+VERS-TLS1.2"
        argv = ["gnutls-serv", "--echo", "-p", str(port), "--x509certfile",
                str(certs / "server.pem"), "--x509keyfile", str(certs / "server.key"),
                "--priority", prio]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        # Listening, seen from outside (ss): a probe connection would use s_server's one
        # accept (-naccept 1).
        end = time.monotonic() + 10
        while not listening(port):
            assert proc.poll() is None, f"{argv[0]} exited with {proc.returncode}"
            assert time.monotonic() < end, f"{argv[0]} does not listen on {port}"
            time.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait()


def handshake(engine: TlsEngine, sock: socket.socket) -> None:
    sock.settimeout(5)
    while not engine.handshake():
        out = engine.outgoing()
        if out:
            sock.sendall(out)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed during the handshake")
        engine.receive(data)
    out = engine.outgoing()
    if out:
        sock.sendall(out)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("engine", ENGINES)
def test_client_engine_against_real_server(engine: str, tool: str, version: str,
                                           certs: Path) -> None:
    with server(tool, certs, version) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        cli = client_engine(engine, ca_file=certs / "ca.pem",
                            server_hostname="server.example.test")
        handshake(cli, sock)
        facts = cli.facts()
        assert facts.version == version
        assert facts.peer is not None and facts.peer_verified
        assert "server.example.test" in facts.peer.san_dns
        if tool == "gnutls":  # it echoes what it gets
            cli.write(b"OPTIONS ping\r\n")
            sock.sendall(cli.outgoing())
            got = b""
            while b"ping" not in got:
                data = sock.recv(65536)
                if not data:
                    break
                cli.receive(data)
                got += cli.read()
                out = cli.outgoing()
                if out:
                    sock.sendall(out)
            assert b"OPTIONS ping" in got


@pytest.mark.parametrize("engine", ENGINES)
def test_client_engine_refuses_the_wrong_name(engine: str, certs: Path) -> None:
    with server("gnutls", certs, "TLSv1.3") as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        cli = client_engine(engine, ca_file=certs / "ca.pem",
                            server_hostname="other.example.test")
        with pytest.raises(Exception) as info:
            handshake(cli, sock)
        assert getattr(info.value, "reason", "") == "verify_failed"


@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("engine", ENGINES)
def test_client_profile_against_real_server(engine: str, tool: str, certs: Path) -> None:
    """A [client.NAME] profile built as the outbound side builds it, with only secp384r1 and
    (where the engine can) only ChaCha20 offered, meets another stack that takes any: the
    handshake succeeds on the profile's suite."""
    from tlsbridge.daemon.config import ClientProfile
    from tlsbridge.daemon.engines.registry import client_engine_factory

    kw = {} if engine == "openssl" else {"tls13_ciphersuites": "TLS_CHACHA20_POLY1305_SHA256"}
    factory = client_engine_factory(ClientProfile(
        name="out", engine=engine, ca_list=certs / "ca.pem", min_version="TLSv1.3",
        groups="secp384r1", **kw))
    with server(tool, certs, "TLSv1.3") as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        cli = factory("server.example.test")
        handshake(cli, sock)
        facts = cli.facts()
        assert facts.version == "TLSv1.3" and facts.peer_verified
        if engine != "openssl":
            assert facts.cipher == "TLS_CHACHA20_POLY1305_SHA256"
