"""Broken keys and certificates: start-up refuses with a message naming the file, and the same
breakage at reload changes nothing (live and new connections keep the old, working set).

The daemon runs as `nobody` here, so that an unreadable key is really unreadable (root reads
anything)."""

from __future__ import annotations

import datetime
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.faults.lab import Bystander, Lab, daemon_healthy, lab_config, lab_stack
from tests.integration.conftest import ENGINES
from tests.support.procs import free_tcp_udp_port
from tlsbridge.shared import events as ev
from tlsbridge.shared.control import ControlError

pytestmark = [pytest.mark.integration]

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
RIGHT_PASSWORD = "correct-horse-31337"
WRONG_PASSWORD = "battery-staple-4242"

CASES = ["missing_key", "unreadable_key", "wrong_password", "key_does_not_match",
         "expired_certificate", "bad_ca_file"]


@dataclass
class Broken:
    certs: dict[str, Path]
    extra: str  # lines for [profile.default]
    culprit: Path  # the file the message must name
    says: tuple[str, ...]  # and one of these words (case-insensitive)


def shared_dir() -> Path:
    """A directory `nobody` can read (pytest's tmp_path is root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="tlsb-security-"))
    d.chmod(0o755)
    return d


def write_pki(d: Path) -> dict[str, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("localhost", "127.0.0.1")
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue_cert("localhost", "127.0.0.1", not_before=now - datetime.timedelta(days=30),
                            not_after=now - datetime.timedelta(days=1))
    ca.cert_pem.write_to_path(d / "ca.pem")
    leaf.cert_chain_pems[0].write_to_path(d / "server.pem")
    leaf.private_key_pem.write_to_path(d / "server.key")
    other.private_key_pem.write_to_path(d / "other.key")
    expired.cert_chain_pems[0].write_to_path(d / "expired.pem")
    expired.private_key_pem.write_to_path(d / "expired.key")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    (d / "encrypted.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(RIGHT_PASSWORD.encode())))
    shutil.copy(d / "server.key", d / "unreadable.key")
    (d / "bad-ca.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nthis is not base64 at all!\n-----END CERTIFICATE-----\n")
    for f in d.iterdir():
        f.chmod(0o644)
    (d / "unreadable.key").chmod(0o600)  # root's; the daemon runs as nobody
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


def broken(case: str, d: Path, good: dict[str, Path]) -> Broken:
    c = dict(good)
    if case == "missing_key":
        c["key"] = d / "no-such.key"
        return Broken(c, "", c["key"], ("not exist", "no such"))
    if case == "unreadable_key":
        c["key"] = d / "unreadable.key"
        return Broken(c, "", c["key"], ("readable", "permission"))
    if case == "wrong_password":
        c["key"] = d / "encrypted.key"
        return Broken(c, f'private_key_password = "{WRONG_PASSWORD}"', c["key"],
                      ("password", "decrypt"))
    if case == "key_does_not_match":
        c["key"] = d / "other.key"
        return Broken(c, "", c["key"], ("match", "mismatch"))
    if case == "expired_certificate":
        c["cert"], c["key"] = d / "expired.pem", d / "expired.key"
        return Broken(c, "", c["cert"], ("expired",))
    if case == "bad_ca_file":
        c["ca"] = d / "bad-ca.pem"
        return Broken(c, "", c["ca"], ("ca",))
    raise AssertionError(case)


def check_message(text: str, b: Broken) -> None:
    assert str(b.culprit) in text, f"the message does not name {b.culprit}:\n{text}"
    assert any(w in text.lower() for w in b.says), f"the message does not say {b.says}:\n{text}"
    assert WRONG_PASSWORD not in text and RIGHT_PASSWORD not in text, "a password was printed"


@pytest.fixture(scope="module")
def pki() -> Iterator[tuple[Path, dict[str, Path]]]:
    d = shared_dir()
    try:
        yield d, write_pki(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES)
def test_start_up_refuses_with_a_clear_message(
    pki: tuple[Path, dict[str, Path]], case: str, engine: str
) -> None:
    d, good = pki
    b = broken(case, d, good)
    work = Path(tempfile.mkdtemp(prefix="tlsb-run-", dir=d))
    work.chmod(0o777)
    try:
        config = lab_config(work, b.certs, extra=b.extra, engine=engine)
        config.chmod(0o644)
        argv = [*AS_NOBODY, sys.executable, "-m", "tlsbridge.daemon.cli", "run", "-c", str(config)]
        running: subprocess.TimeoutExpired | None = None
        try:  # subprocess.run kills the daemon (by its PID) if it is still running
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired as exc:
            running = exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if running is not None:
        log = (running.stderr or b"").decode(errors="replace")
        pytest.fail(f"the daemon started with a broken configuration ({case}) and was still "
                    f"running after 10 s:\n{log}")
    text = out.stdout + out.stderr
    assert out.returncode != 0, f"the daemon started with a broken configuration:\n{text}"
    check_message(text, b)
    assert "Traceback" not in text, f"a traceback instead of a message:\n{text}"


@pytest.mark.parametrize("engine", ENGINES)
def test_encrypted_key_with_the_right_password_is_accepted(
    pki: tuple[Path, dict[str, Path]], engine: str, tmp_path: Path
) -> None:
    """The control case of wrong_password: the right one starts, and never asks a terminal."""
    d, good = pki
    certs = dict(good, key=d / "encrypted.key")
    with lab_stack(tmp_path, certs, with_kamailio=False, engine=engine,
                   extra=f'private_key_password = "{RIGHT_PASSWORD}"') as lab:
        ua = lab.ua()
        ua.close()
        daemon_healthy(lab)
        log = lab.daemon.log.read_text(errors="replace")
    assert "pass phrase" not in log.lower(), log


# -- the same at reload -------------------------------------------------------------------------


@dataclass
class ReloadLab:
    lab: Lab
    engine: str
    run_dir: Path


@pytest.fixture(scope="module", params=ENGINES)
def reload_lab(request: pytest.FixtureRequest,
               pki: tuple[Path, dict[str, Path]]) -> Iterator[ReloadLab]:
    d, good = pki
    work = Path(tempfile.mkdtemp(prefix=f"tlsb-reload-{request.param}-", dir=d))
    work.chmod(0o755)
    run = work / "run"
    run.mkdir(mode=0o750)
    os.chown(run, NOBODY, NOBODY)
    ports = tuple(free_tcp_udp_port() for _ in range(3))
    config = lab_config(work, good, engine=request.param, run_dir=run, ports=ports)  # type: ignore[arg-type]
    config.chmod(0o644)
    try:
        with lab_stack(work, good, config=config, daemon_prefix=AS_NOBODY) as lab:
            yield ReloadLab(lab, request.param, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def served_certificate(lab: Lab) -> bytes:
    ua = lab.ua()
    try:
        return ua.sock.getpeercert(binary_form=True)
    finally:
        ua.close()


@pytest.mark.parametrize("case", CASES)
def test_reload_with_the_same_breakage_changes_nothing(
    reload_lab: ReloadLab, pki: tuple[Path, dict[str, Path]], case: str
) -> None:
    lab = reload_lab.lab
    d, good = pki
    b = broken(case, d, good)
    original = lab.config.read_text()
    bystander = Bystander(lab)
    before = served_certificate(lab)
    scratch = Path(tempfile.mkdtemp(prefix="tlsb-cfg-", dir=d))
    try:
        text = lab_config(scratch, b.certs, extra=b.extra, engine=reload_lab.engine,
                          run_dir=reload_lab.run_dir,
                          ports=(lab.tls_port, lab.sip_port, lab.hairpin_port)).read_text()
        lab.config.write_text(text)
        with pytest.raises(ControlError) as refused:
            lab.daemon.request("reload")
        assert refused.value.code == "reload_failed", refused.value
        check_message(refused.value.message, b)
        failed = lab.events.wait_for(lambda e: e.type == ev.CONFIG_RELOAD_FAILED
                                     and str(b.culprit) in str(e.fields.get("reason")))
        check_message(str(failed.fields), b)
        # Nothing changed: the live connection carries on, new ones get the old certificate.
        bystander.check()
        assert served_certificate(lab) == before
        daemon_healthy(lab)
    finally:
        lab.config.write_text(original)
        shutil.rmtree(scratch, ignore_errors=True)
        bystander.close()
        try:  # back to the good set even when the daemon wrongly took the broken one
            restored = lab.daemon.request("reload")
        except ControlError as exc:
            restored = {"ok": False, "error": str(exc)}
    assert restored["ok"], restored  # and the good file reloads fine again


def test_the_test_certificates_verify() -> None:
    """Guard: the PKI above is what the cases say (a wrong guard would make them vacuous)."""
    d = shared_dir()
    try:
        good = write_pki(d)
        ctx = ssl.create_default_context(cafile=str(good["ca"]))
        ctx.load_cert_chain(good["cert"], d / "encrypted.key", password=RIGHT_PASSWORD)
        with pytest.raises(ssl.SSLError):
            ctx.load_cert_chain(good["cert"], d / "other.key")
        with pytest.raises(ssl.SSLError):
            ctx.load_cert_chain(good["cert"], d / "encrypted.key", password=WRONG_PASSWORD)
    finally:
        shutil.rmtree(d, ignore_errors=True)
