"""Secure defaults: the ipc sockets' directory and files are not open to others, key passwords
never reach the log, events or replies, and TLS secrets are logged only when asked for."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.faults.lab import Bystander, Lab, daemon_healthy, lab_config, lab_stack
from tests.integration.conftest import ENGINES
from tests.support.sip import build_request
from tlsbridge.shared import events as ev
from tlsbridge.shared.control import ControlError

pytestmark = [pytest.mark.integration]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("run_dir_state", ["created_by_daemon", "created_under_umask_0",
                                           "preexisting_world_writable"])
def test_ipc_sockets_are_not_open_to_others(
    tmp_path: Path, fault_certs: dict[str, Path], run_dir_state: str
) -> None:
    run = tmp_path / "run" / "tlsbridge"
    prefix: list[str] = []
    if run_dir_state == "created_under_umask_0":
        prefix = ["sh", "-c", 'umask 000; exec "$@"', "sh"]
    if run_dir_state == "preexisting_world_writable":
        run.mkdir(parents=True)
        run.chmod(0o777)
    config = lab_config(tmp_path, fault_certs, run_dir=run)
    with lab_stack(tmp_path, fault_certs, config=config, daemon_prefix=prefix) as lab:
        sockets = [Path(e.removeprefix("ipc://")) for e in
                   (lab.daemon.settings.events_endpoint, lab.daemon.settings.control_endpoint)]
        for sock in sockets:
            assert sock.parent == run and stat.S_ISSOCK(os.stat(sock).st_mode)
            assert mode(sock) & ~0o660 == 0, f"{sock} is {oct(mode(sock))}, want 0660 or stricter"
        assert mode(run) & ~0o750 == 0, (
            f"run_dir {run} is {oct(mode(run))}: others can replace the control and events "
            f"sockets (want 0750 or stricter)")
        Bystander(lab).close()


PASSWORD = "Sekr1t-Pa55phrase-do-not-log"
WRONG = "Wr0ng-Pa55phrase-do-not-log"


def encrypted_key(d: Path) -> dict[str, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(d / "ca.pem")
    leaf.cert_chain_pems[0].write_to_path(d / "server.pem")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    (d / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSWORD.encode())))
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.mark.parametrize("engine", ENGINES)
def test_key_passwords_are_never_logged(tmp_path: Path, engine: str) -> None:
    certs = encrypted_key(tmp_path)
    extra = f'private_key_password = "{PASSWORD}"'
    config = lab_config(tmp_path, certs, extra=extra, engine=engine)
    text = config.read_text()  # log_level = "debug": the most talkative
    with lab_stack(tmp_path, certs, config=config) as lab:
        bystander = Bystander(lab)
        bystander.check()
        replies = [str(lab.daemon.request(op)) for op in ("stats", "list", "ping")]
        replies.append(str(lab.daemon.request("reload")))
        # A reload with the wrong password fails; its message must not echo it either.
        config.write_text(text.replace(PASSWORD, WRONG))
        with pytest.raises(ControlError) as refused:
            lab.daemon.request("reload")
        replies.append(str(refused.value))
        config.write_text(text)
        replies.append(str(lab.daemon.request("reload")))
        lab.events.wait_for(lambda e: e.type == ev.CONFIG_RELOAD_FAILED)
        events = [str(e.to_dict()) for e in lab.events.events]
        bystander.close()
        daemon_healthy(lab)
    checked = subprocess.run([sys.executable, "-m", "tlsbridge.daemon.cli", "check", "-c",
                              str(config)], capture_output=True, text=True, timeout=30)
    config.write_text(text.replace(PASSWORD, WRONG))
    # (killed by subprocess.run after 15 s if it wrongly starts)
    failed_start = subprocess.run([sys.executable, "-m", "tlsbridge.daemon.cli", "run", "-c",
                                   str(config)], capture_output=True, text=True, timeout=15)
    assert failed_start.returncode != 0
    log = lab.daemon.log.read_text(errors="replace")
    assert 'log_level = "debug"' in text  # the most talkative level was on
    for where, content in [("daemon log", log), ("control replies", "\n".join(replies)),
                           ("events", "\n".join(events)),
                           ("tlsbridge check", checked.stdout + checked.stderr),
                           ("failed start-up", failed_start.stdout + failed_start.stderr)]:
        for secret in (PASSWORD, WRONG):
            assert secret not in content, f"a key password appears in the {where}"


def tls_client_with_keylog(lab: Lab, keylog: Path) -> None:
    ctx = ssl.create_default_context(cafile=lab.ca)
    ctx.keylog_filename = str(keylog)
    with socket.create_connection(lab.tls_addr, timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(build_request("OPTIONS", f"sip:127.0.0.1:{lab.tls_port}", via_proto="TLS",
                                  local=tls.getsockname()[:2]))
        assert tls.recv(65536).startswith(b"SIP/2.0 200 ")


def client_randoms(keylog: Path) -> set[str]:
    if not keylog.exists():
        return set()
    return {line.split()[1] for line in keylog.read_text().splitlines()
            if line and not line.startswith("#") and len(line.split()) == 3}


@pytest.mark.parametrize("engine", ENGINES)
def test_no_key_logging_unless_configured(tmp_path: Path, fault_certs: dict[str, Path],
                                          engine: str) -> None:
    """Not even SSLKEYLOGFILE in the daemon's environment makes it log TLS secrets."""
    env_log = tmp_path / "env-keylog.txt"
    with lab_stack(tmp_path, fault_certs, engine=engine,
                   daemon_env={"SSLKEYLOGFILE": str(env_log)}) as lab:
        mine = tmp_path / "client-keylog.txt"
        tls_client_with_keylog(lab, mine)
        assert client_randoms(mine)
        daemon_healthy(lab)
        assert not client_randoms(env_log), f"TLS secrets were written to {env_log}"
        log = lab.daemon.log.read_text(errors="replace")
        assert "key logging" not in log.lower()


@pytest.mark.parametrize("engine", ENGINES)
def test_key_logging_when_configured(tmp_path: Path, fault_certs: dict[str, Path],
                                     engine: str) -> None:
    keylog = tmp_path / "keys" / "tls-keys.log"
    keylog.parent.mkdir()
    with lab_stack(tmp_path, fault_certs, engine=engine,
                   daemon_extra=f'keylog_file = "{keylog}"') as lab:
        mine = tmp_path / "client-keylog.txt"
        tls_client_with_keylog(lab, mine)
        daemon_healthy(lab)
        log = lab.daemon.log.read_text(errors="replace")
        assert "key logging" in log.lower() and str(keylog) in log, "no warning at start"
        theirs = client_randoms(keylog)
        assert client_randoms(mine) <= theirs, (
            f"the daemon ({engine}) did not log this connection's secrets to {keylog}")
        assert mode(keylog) & 0o077 == 0, (
            f"{keylog} holds TLS secrets and is {oct(mode(keylog))}: want 0600 or stricter")
