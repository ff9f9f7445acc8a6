"""A newcomer follows the README on a fresh clone: `make up`, an OPTIONS over TLS with the
documented openssl command, `tlsbridge status`, `tlsbridge events`, `tlsbridge reload`,
`make down`. It runs in a network namespace of its own, so the README's fixed ports (5060-5062)
never meet another test or a developer's `make up`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import ROOT

pytestmark = [pytest.mark.integration]

README = (ROOT / "README.md").read_text()


def readme_block(starting: str) -> str:
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        if block.lstrip().startswith(starting):
            return block
    raise AssertionError(f"README has no sh block starting with {starting!r}")


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 for a network namespace")
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    d = tmp_path_factory.mktemp("newcomer") / "tlsbridge"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(d)], check=True)
    # Packages are fetched here, outside the namespace that has no way out.
    subprocess.run(["make", "-C", str(d), "venv"], check=True, capture_output=True, timeout=600)
    yield d


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = f"tlsb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def sh(netns: str, cwd: Path, script: str,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, "bash", "-c", script], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_readme_walkthrough(clone: Path, netns: str) -> None:
    up = sh(netns, clone, "make up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "SIP over TLS  127.0.0.1:5061" in up.stdout
        assert "SIP over WSS  wss://127.0.0.1:8443/" in up.stdout
        again = sh(netns, clone, "make up")  # harmless the second time
        assert again.returncode == 0 and "already running" in again.stdout

        options = sh(netns, clone, readme_block("(printf 'OPTIONS"))
        assert "SIP/2.0 200 OK" in options.stdout, options.stdout + options.stderr
        assert re.search(r"X-TLS: TLSv1\.3; \S+; sni=-; peer=127\.0\.0\.1:\d+; verified=0",
                         options.stdout)

        # The same facts over WSS, as a browser's connection has them.
        wss = sh(netns, clone, readme_block(".venv/bin/python scripts/sip_ping.py wss"))
        assert "SIP/2.0 200 OK" in wss.stdout, wss.stdout + wss.stderr
        assert re.search(r"X-TLS: TLSv1\.3; \S+; sni=-; peer=127\.0\.0\.1:\d+; verified=0",
                         wss.stdout)

        env = "export TLSBRIDGE_CONFIG=$PWD/kamailio-cfg/tlsbridge.toml; "
        tail = subprocess.Popen(
            ["ip", "netns", "exec", netns, "bash", "-c",
             env + ".venv/bin/tlsbridge events --duration 6"],
            cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Subscribed once the daemon's greeting is printed (bounded by --duration).
        assert tail.stdout is not None
        greeting = tail.stdout.readline()
        assert "daemon.started" in greeting, greeting
        held = subprocess.Popen(
            ["ip", "netns", "exec", netns, "bash", "-c",
             "sleep 3 | openssl s_client -connect 127.0.0.1:5061 -quiet -no_ign_eof "
             "-CAfile run/certs/ca.pem"],
            cwd=clone, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The held connection is up once `status` lists it.
        end = time.monotonic() + 10
        while True:
            status = sh(netns, clone, env + ".venv/bin/tlsbridge status")
            if status.returncode == 0 and "TLSv1.3" in status.stdout:
                break
            assert time.monotonic() < end, status.stdout + status.stderr
            time.sleep(0.1)
        assert sh(netns, clone, env + ".venv/bin/tlsbridge ping").returncode == 0
        reload = sh(netns, clone, env + ".venv/bin/tlsbridge reload")
        assert reload.returncode == 0 and "reloaded" in reload.stdout, reload.stderr
        held.wait(timeout=20)
        out, err = tail.communicate(timeout=20)
        out = greeting + out
        assert "tls.established" in out and "conn.closed" in out, out + err
        assert "config.reloaded" in out
    finally:
        down = sh(netns, clone, "make down")
    assert down.returncode == 0
    assert "stopped tlsbridge" in down.stdout and "stopped kamailio" in down.stdout
    # Nothing is left behind in the namespace.
    left = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
