"""A production install: the wheel built from this tree, installed into a fresh venv (not
editable), serves TLS with Kamailio importing the KEMI module from that venv and the daemon run
from it. Nothing of the source tree is importable there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.procs import CFG, Daemon, Kamailio, free_tcp_udp_port, write_bridge_config
from tests.support.sip import TlsUA

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("daemon", "kemi", "shared")


def run(*argv: str, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(argv)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: building must not leave build/ or egg-info in the tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "run", "build", "*.egg-info", "__pycache__", "bench"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src))
    (found,) = out.glob("*.whl")
    return found


def test_the_wheel_holds_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"tlsbridge/{p.relative_to(ROOT)}" for part in PARTS
              for p in (ROOT / part).rglob("*.py")}
    assert wanted - names == set()


def test_kamailio_and_the_daemon_from_an_installed_wheel_answer_tls(
        wheel: Path, tmp_path: Path, certs: dict[str, Path]) -> None:
    venv = tmp_path / "venv"
    # Debian's python3: the interpreter Kamailio embeds.
    run("/usr/bin/python3", "-m", "venv", str(venv))
    run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel))
    assert (venv / "bin" / "tlsbridge").exists()
    # The reference script, away from the source tree: only the venv can provide tlsbridge.
    script = tmp_path / "routing.py"
    shutil.copy(CFG / "routing.py", script)
    tls_port, sip_port, hairpin_port = (free_tcp_udp_port() for _ in range(3))
    config = write_bridge_config(tmp_path / "tlsbridge.toml", tls_port=tls_port,
                                 hairpin_port=hairpin_port, sip_port=sip_port, certs=certs,
                                 run_dir=tmp_path / "run")
    daemon = Daemon(tmp_path, config, python=str(venv / "bin" / "python"))
    kamailio = Kamailio(tmp_path, sip_port=sip_port, hairpin_port=hairpin_port,
                        tls_port=tls_port, bridge_config=config, script=script,
                        venv=str(venv), env={"PYTHONPATH": ""})
    try:
        daemon.wait_ready()
        kamailio.wait_ready()
        ua = TlsUA("127.0.0.1", tls_port, ca=str(certs["ca"]))
        try:
            reply = ua.request("OPTIONS", f"sip:127.0.0.1:{tls_port}")
            version = ua.sock.version()
        finally:
            ua.close()
        assert reply.status == 200
        assert reply.get("X-TLS").startswith(f"{version}; ")
        # The daemon that answered is the venv's, not this tree's.
        cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0] == str(venv / "bin" / "python").encode()
    finally:
        for proc in (kamailio, daemon):
            if proc.alive():
                print(f"--- {proc.name} ---\n{proc.tail(30)}")
            proc.stop()
