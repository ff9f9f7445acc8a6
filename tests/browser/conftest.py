"""A real browser against the real stack: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, running the browser phone of scripts/webphone (SIP.js from the npm
registry) over WSS through the daemon into Kamailio's websocket module.

The development CA is trusted by the server key's SPKI hash
(`--ignore-certificate-errors-spki-list`, honoured with `--user-data-dir`): no NSS database.
Without chromium, chromedriver or npm the tests fail (make deps installs them), or are skipped
with TLSBRIDGE_TEST_ALLOW_MISSING=1 (tests/support/requirements.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.integration.conftest import certs, stop_stack  # noqa: F401 - the certs fixture
from tests.integration.test_websocket import WssStack, start_wss_stack
from tests.support import requirements
from tests.support.procs import ROOT, Proc, free_port, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def _missing() -> list[str]:
    out = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    out += [n for n in ("npm", "kamailio") if shutil.which(n) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        out.append("selenium (pip)")
    return out


@pytest.fixture(scope="session", autouse=True)
def _browser_tools() -> None:
    missing = _missing()
    if missing:
        requirements.missing(f"browser tests need {', '.join(missing)} (make deps installs "
                             "them)")


def spki_hash(cert_pem: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what --ignore-certificate-errors-spki-list takes."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@dataclass
class WebPhone:
    url: str
    origin: str


@contextlib.contextmanager
def serve_webphone(log_dir: Path) -> Iterator[WebPhone]:
    """scripts/webphone.py on a free port (it installs SIP.js with npm on first use)."""
    port = free_port()
    proc = Proc("webphone", [sys.executable, str(ROOT / "scripts" / "webphone.py"),
                             "--port", str(port), "--quiet"], log_dir / f"webphone-{port}.log",
                dict(os.environ))

    def answers() -> bool:
        if not proc.alive():
            raise RuntimeError(f"webphone.py exited:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    try:
        wait_until(answers, 200, "webphone.py to serve (npm install of SIP.js included)")
        yield WebPhone(f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}")
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def webphone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebPhone]:
    """The phone page, from the Origin the WSS listener allows."""
    with serve_webphone(tmp_path_factory.mktemp("webphone")) as served:
        yield served


@pytest.fixture(scope="session")
def foreign_webphone(tmp_path_factory: pytest.TempPathFactory,
                     webphone: WebPhone) -> Iterator[WebPhone]:
    """The same page from another Origin (another port), which the listener does not allow."""
    with serve_webphone(tmp_path_factory.mktemp("foreign")) as served:
        yield served


@pytest.fixture(scope="module", params=["kemi", "native"])
def wss(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path],  # noqa: F811
        webphone: WebPhone, request: pytest.FixtureRequest) -> Iterator[WssStack]:
    """The stack with a WSS listener allowing the phone page's Origin; every browser test runs
    with the KEMI reference routing and with the native one (routing-native.cfg)."""
    s = start_wss_stack(tmp_path_factory.mktemp(f"wss-browser-{request.param}"), certs,
                        [webphone.origin], routing=request.param)
    yield s
    stop_stack(s.stack)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.fixture(scope="module")
def chrome(certs: dict[str, Path]) -> Iterator:  # noqa: F811
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tlsbridge-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--user-data-dir={profile}",
                 f"--ignore-certificate-errors-spki-list={spki_hash(certs['cert'])}"):
        opts.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_script_timeout(15)
    driver.set_page_load_timeout(15)
    pid = service.process.pid
    try:
        yield driver
    finally:
        leftovers = _descendants(pid)
        with contextlib.suppress(Exception):
            driver.quit()
        # Whatever quit() left behind (it can fail half-way), by PID.
        for p in [pid, *leftovers]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        shutil.rmtree(profile, ignore_errors=True)


class Tab:
    """One browser tab running the phone page; `events()` is what the page logged."""

    def __init__(self, driver, url: str) -> None:  # type: ignore[no-untyped-def]
        self.driver = driver
        driver.switch_to.new_window("tab")
        self.handle = driver.current_window_handle
        driver.get(url)
        self.wait_event("ready")

    def run(self, js: str, *args: object) -> object:
        """Run an async phone call in the page; raise if it rejected."""
        self.driver.switch_to.window(self.handle)
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"Promise.resolve().then(() => {js}).then(() => done('ok'),"
            " (e) => done('error: ' + e));", *args)
        assert result == "ok", f"{js}: {result}; page log: {self.events()}"
        return result

    def events(self) -> list[str]:
        self.driver.switch_to.window(self.handle)
        return list(self.driver.execute_script("return window.phone ? window.phone.events : []"))

    def wait_event(self, text: str, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.events():
                return
            time.sleep(0.05)
        raise AssertionError(f"the page did not log {text!r} in {timeout} s: {self.events()}")

    def close(self) -> None:
        self.driver.switch_to.window(self.handle)
        self.driver.close()
        self.driver.switch_to.window(self.driver.window_handles[0])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
