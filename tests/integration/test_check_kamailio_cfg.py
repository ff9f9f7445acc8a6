"""`tlsbridge check -c FILE --kamailio-cfg CFG` (README "Running it in production", docs/
security.md, docs/migration.md) reports each problem it claims to: the real command, on the
reference kamailio.cfg with one thing broken at a time, beside a running Kamailio (the hairpin
probe) started from that same reference cfg.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.support.procs import CFG, free_tcp_udp_port

pytestmark = [pytest.mark.integration]

REFERENCE = (CFG / "kamailio.cfg").read_text()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("check-cfg"), certs)
    yield s
    stop_stack(s)


def check(stack: Stack, cfg_text: str, tmp_path: Path, *, config: Path | None = None,
          offline: bool = False) -> tuple[int, list[tuple[str, str]]]:
    """Run the command on `cfg_text` with the defines the stack's Kamailio runs with; its exit
    code and findings (level, message)."""
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(cfg_text)
    defines = [f"SIP_PORT={stack.sip_port}", f"HAIRPIN_PORT={stack.hairpin_port}",
               f"TLS_PORT={stack.tls_port}", f'KEMI_SCRIPT="{CFG / "routing.py"}"']
    argv = [sys.executable, "-m", "tlsbridge.daemon.cli", "check", "-c",
            str(config or stack.daemon.config), "--kamailio-cfg", str(cfg)]
    for d in defines:
        argv += ["-A", d]
    if offline:
        argv.append("--offline")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    findings = [(m.group(1), m.group(2)) for m in
                re.finditer(r"^(ok|warning|error): (.*)$", out.stdout, re.M)]
    assert findings, out.stdout + out.stderr
    return out.returncode, findings


def test_the_reference_cfg_passes(stack: Stack, tmp_path: Path) -> None:
    code, findings = check(stack, REFERENCE, tmp_path)
    assert code == 0 and not [f for f in findings if f[0] == "error"], findings
    assert ("ok", f"Kamailio answers on the hairpin listener 127.0.0.1:{stack.hairpin_port}") \
        in findings, findings
    assert not [f for f in findings if f[0] == "warning" and "cfg" not in f[1]
                and "run_dir" not in f[1] and "expires" not in f[1]], findings


def without(line: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        assert re.search(rf"^{re.escape(line)}\s*$", text, re.M), f"no line {line!r}"
        return re.sub(rf"^{re.escape(line)}\s*$", "", text, flags=re.M)
    return change


def adding(line: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        return text.replace("\nlisten=udp:SIP_IP:SIP_PORT\n",
                            f"\nlisten=udp:SIP_IP:SIP_PORT\n{line}\n", 1)
    return change


def replacing(old: str, new: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        assert old in text, f"no {old!r}"
        return text.replace(old, new, 1)
    return change


# (what is broken, the change, the level reported, words of the finding)
PROBLEMS = [
    ("no_tcp_accept_haproxy", without("tcp_accept_haproxy=yes"), "error",
     "tcp_accept_haproxy is not yes"),
    ("other_plain_tcp_listener", adding("listen=tcp:127.0.0.1:5999"), "error",
     "other plain TCP listeners (tcp:127.0.0.1:5999)"),
    ("tls_module", adding('loadmodule "tls.so"'), "error", "tls.so is loaded"),
    ("listen_tls", adding("listen=tls:127.0.0.1:5998"), "error", "listen=tls:... remains"),
    ("enable_tls", replacing("enable_tls=no", "enable_tls=yes"), "error", "enable_tls = yes"),
    ("no_tls_alias", without("alias=tls:TLS_IP:TLS_PORT"), "warning",
     "no alias=tls:127.0.0.1:"),
    ("no_hairpin_listener", without("listen=tcp:HAIRPIN_IP:HAIRPIN_PORT"), "error",
     "no hairpin listener"),
    ("no_udp_listener", without("listen=udp:SIP_IP:SIP_PORT"), "error", "no UDP listener"),
    ("no_received_avp", without('modparam("registrar", "received_avp", "$avp(RECEIVED)")'),
     "error", "registrar has no received_avp"),
    ("no_app_python3", without('loadmodule "app_python3.so"'), "error",
     "app_python3 is not loaded"),
    ("no_tcp_defer_accept", without("tcp_defer_accept=3"), "warning",
     "tcp_defer_accept is not set"),
    ("no_tcp_wait_data", without("tcp_wait_data=500"), "warning", "tcp_wait_data = 5000"),
    ("no_tcp_no_connect", without("tcp_no_connect=yes"), "warning",
     "tcp_no_connect is not yes"),
]


@pytest.mark.parametrize(("change", "level", "words"), [p[1:] for p in PROBLEMS],
                         ids=[p[0] for p in PROBLEMS])
def test_each_problem_is_reported(stack: Stack, tmp_path: Path,
                                  change: Callable[[str], str], level: str, words: str) -> None:
    code, findings = check(stack, change(REFERENCE), tmp_path, offline=True)
    hits = [f for f in findings if words in f[1]]
    assert hits, f"{words!r} not reported: {findings}"
    assert {f[0] for f in hits} == {level}, hits
    assert code == (1 if level == "error" else 0), (code, findings)
    # The reference cfg, checked the same way, reports none of it.
    _, clean = check(stack, REFERENCE, tmp_path, offline=True)
    assert not [f for f in clean if words in f[1]], clean


def test_a_hairpin_nobody_answers_is_an_error(stack: Stack, tmp_path: Path) -> None:
    nobody = free_tcp_udp_port()
    config = tmp_path / "tlsbridge.toml"
    config.write_text(stack.daemon.config.read_text().replace(
        f'hairpin = "127.0.0.1:{stack.hairpin_port}"', f'hairpin = "127.0.0.1:{nobody}"'))
    code, findings = check(stack, REFERENCE.replace("HAIRPIN_PORT", str(nobody)), tmp_path,
                           config=config)
    assert code == 1
    assert [f for f in findings if f[0] == "error" and
            f"hairpin listener 127.0.0.1:{nobody} does not answer" in f[1]], findings


def test_a_run_dir_off_tmpfs_is_warned_about(stack: Stack, tmp_path: Path) -> None:
    """README: keep run_dir on tmpfs; `tlsbridge check` warns when it would not be."""
    on_disk = Path(__file__).resolve().parent / ".check-run-dir"  # in the clone, not tmpfs
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(on_disk.parent)],
                            capture_output=True, text=True, check=True).stdout.strip()
    config = tmp_path / "tlsbridge.toml"
    text = stack.daemon.config.read_text()
    config.write_text(re.sub(r'^run_dir = ".*"$', f'run_dir = "{on_disk}"', text, flags=re.M))
    _, findings = check(stack, REFERENCE, tmp_path, config=config, offline=True)
    about = [f for f in findings if f"run_dir {on_disk}" in f[1]]
    assert len(about) == 1, findings
    if fstype == "tmpfs":
        assert about[0][0] == "ok", about
    else:
        assert about[0][0] == "warning" and "not tmpfs" in about[0][1], (fstype, about)
