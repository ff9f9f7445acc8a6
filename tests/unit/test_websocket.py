"""WSS listeners: the daemon's configuration, what the KEMI side reads of it, and the upgrade's
policy (kemi/websocket.py) against the KSR stubs. End to end: tests/integration/test_websocket.py
and tests/browser."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_config import VALID, ca, edit, etc, write  # noqa: F401 - fixtures
from tlsbridge.daemon.config import ConfigError, load_config
from tlsbridge.kemi import testing
from tlsbridge.kemi.bridge import TlsBridge
from tlsbridge.kemi.websocket import origin_allowed
from tlsbridge.shared.settings import load_settings

WSS = ('\n[[listener]]\naddress = "0.0.0.0:8443"\ntransport = "wss"\n'
       'advertise = "203.0.113.10:443"\n')


def test_wss_listener_config(etc: Path) -> None:  # noqa: F811
    cfg = load_config(write(etc, VALID + WSS + 'origins = ["https://app.example"]\n'))
    wss = cfg.listeners[-1]
    assert (wss.transport, wss.origins, wss.advertise) == \
        ("wss", ("https://app.example",), "203.0.113.10:443")
    assert cfg.listeners[0].transport == "tls" and cfg.listeners[0].origins is None


@pytest.mark.parametrize(("extra", "message"), [
    ('\n[[listener]]\naddress = "0.0.0.0:8443"\ntransport = "ws"\n', "listener[2].transport"),
    ('\n[[listener]]\naddress = "0.0.0.0:8443"\norigins = ["https://a"]\n',
     "only a listener with transport"),
    (WSS + "origins = [1]\n", "listener[2].origins"),
])
def test_bad_wss_listener_is_refused(etc: Path, extra: str, message: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_config(write(etc, VALID + extra))


def test_settings_split_tls_and_wss_listeners(etc: Path) -> None:  # noqa: F811
    s = load_settings(write(etc, VALID + WSS))
    assert s.wss_public == {"0.0.0.0:8443": "203.0.113.10:443"}
    assert s.wss_origins == {"0.0.0.0:8443": None}
    assert "0.0.0.0:8443" not in s.tls_public and "0.0.0.0:5061" in s.tls_public


@pytest.mark.parametrize(("origin", "allowed", "ok"), [
    ("https://a.example", None, True),
    (None, None, True),
    ("https://a.example", ("https://a.example",), True),
    ("https://A.example/", ("https://a.example",), True),
    ("https://a.example:8443", ("https://a.example",), False),
    ("http://a.example", ("https://a.example",), False),
    (None, ("https://a.example",), False),
    ("https://evil.example", ("*",), True),
])
def test_origin_allowed(origin: str | None, allowed: tuple[str, ...] | None, ok: bool) -> None:
    assert origin_allowed(origin, allowed) is ok


class _Xhttp:
    def __init__(self) -> None:
        self.replies: list[tuple[int, str]] = []

    def xhttp_reply(self, code: int, reason: str, ctype: str, body: str) -> int:
        self.replies.append((code, reason))
        return 1


class _WebSocket:
    def __init__(self) -> None:
        self.handshakes = 0

    def handle_handshake(self) -> int:
        self.handshakes += 1
        return 1


@pytest.fixture
def ksr() -> Any:
    with testing.install() as k:
        k.xhttp, k.websocket = _Xhttp(), _WebSocket()
        k.set_reply_no_connect = lambda: 1
        k.set_reply_close = lambda: 1
        yield k


def test_upgrade_not_from_the_bridge_is_refused(ksr: Any) -> None:
    bridge = TlsBridge(hairpin=("127.0.0.1", 5062), control="ipc:///nowhere",
                       events="ipc:///nowhere", wss_public={"0.0.0.0:8443": "203.0.113.10:443"})
    # An HTTP upgrade on some other TCP listener: never handed to the websocket module.
    ksr.message(peer=("198.51.100.7", 40001), proto="tcp", conid=3,
                local=("127.0.0.1", 8080), method="GET",
                **{"$hdr(Upgrade)": "websocket", "$hdr(Origin)": "https://a"})
    assert bridge.ws_handshake() == 1
    assert ksr.xhttp.replies == [(403, "Forbidden")]
    assert ksr.websocket.handshakes == 0


def test_origins_are_reread_when_the_file_changes(etc: Path, ksr: Any) -> None:  # noqa: F811
    path = write(etc, VALID + WSS + 'origins = ["https://old.example"]\n')
    bridge = TlsBridge(path)
    assert bridge.wss_origins == {"0.0.0.0:8443": ("https://old.example",)}
    path.write_text(VALID + WSS + 'origins = ["https://new.example"]\n')
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 5))
    bridge._reread_ws_settings()
    assert bridge.wss_origins == {"0.0.0.0:8443": ("https://new.example",)}
    # A broken file keeps the policy it had, and says so.
    path.write_text("[kamailio\n")
    os.utime(path, (st.st_atime, st.st_mtime + 10))
    bridge._reread_ws_settings()
    assert bridge.wss_origins == {"0.0.0.0:8443": ("https://new.example",)}
    assert any("not re-read" in text for _, text in ksr.logs)


REFERENCE_CFG = Path(__file__).resolve().parents[2] / "kamailio-cfg" / "kamailio.cfg"
NATIVE_CFG = Path(__file__).resolve().parents[2] / "kamailio-cfg" / "routing-native.cfg"


def reference_cfg(tmp: Path, native: bool, old: str = "", new: str = "") -> Any:
    """The reference kamailio.cfg as Kamailio evaluates it (KEMI, or WITH_NATIVE_ROUTING with
    routing-native.cfg), copied to `tmp` with `old` replaced by `new` where it is."""
    from tlsbridge.shared.kamcfg import load_cfg

    tmp.mkdir(exist_ok=True)
    main, routes = REFERENCE_CFG.read_text(), NATIVE_CFG.read_text()
    if old:
        if old in main:
            main = edit(main, old, new)
        else:
            routes = edit(routes, old, new)
    (tmp / "kamailio.cfg").write_text(main)
    (tmp / "routing-native.cfg").write_text(routes)
    return load_cfg(tmp / "kamailio.cfg", ["WITH_NATIVE_ROUTING"] if native else [])


@pytest.mark.parametrize(("native", "old", "new", "message"), [
    (False, 'loadmodule "websocket.so"', "", "websocket not loaded"),
    (True, "tcp_accept_no_cl=yes", "", "tcp_accept_no_cl is not yes"),
    (False, 'modparam("xhttp", "event_callback", "ksr_xhttp_event")', "", "event_callback"),
    (False, "alias=WSS_IP:WSS_PORT", "alias=tcp:WSS_IP:WSS_PORT", "no alias=127.0.0.1"),
    (True, 'python_exec("tlsb_ws_handshake");', "ws_handle_handshake();",
     'no python_exec("tlsb_ws_handshake")'),
])
def test_review_of_kamailio_cfg_for_wss(etc: Path, tmp_path: Path, native: bool,  # noqa: F811
                                        old: str, new: str, message: str) -> None:
    if shutil.which("kamailio") is None:
        pytest.skip("kamailio evaluates the cfg (make test installs it)")
    from tlsbridge.shared.kamreview import errors, review_cfg

    settings = load_settings(write(etc, VALID.replace("0.0.0.0:5061", "127.0.0.1:5061") +
                                   '\n[[listener]]\naddress = "127.0.0.1:8443"\n'
                                   'transport = "wss"\n'))
    good = reference_cfg(tmp_path / "good", native)
    assert not [e for e in errors(review_cfg(good, settings)) if "WSS" in e]
    broken = errors(review_cfg(reference_cfg(tmp_path / "bad", native, old, new), settings))
    assert any(message in e for e in broken), broken
