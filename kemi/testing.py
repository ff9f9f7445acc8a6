"""KSR stubs for fast unit tests of KEMI routing scripts and of `tlsbridge.kemi` itself.

This is a small model of the parts of Kamailio's `KSR` module that tlsbridge and a typical
routing script touch: pseudo-variables, htable, logging, header changes and stateless replies.
It is meant for fast unit tests only; it never replaces running the real Kamailio in the
integration tests (no SIP parsing, no transactions, no real pseudo-variable semantics).

Usage::

    from tlsbridge.kemi import TlsBridge
    from tlsbridge.kemi.testing import install

    def test_script_sees_tls():
        with install() as KSR:               # sys.modules["KSR"] is the fake inside the block
            KSR.message(hairpin=("127.0.0.1", 5062), peer=("198.51.100.7", 40001),
                        daemon=("127.0.0.1", 41001), conid=7, method="INVITE")
            entry = {"conn": conn_ref.to_dict(), "tls": tls_facts.to_dict()}
            KSR.htable.sht_sets("tlsb", "127.0.0.1:41001", json.dumps(entry))
            bridge = TlsBridge(hairpin=("127.0.0.1", 5062), control="ipc:///nowhere",
                               events="ipc:///nowhere")
            assert bridge.tls().version == "TLSv1.3"
            assert KSR.logged("err") == []

    # or without a with-block:
    KSR = install()
    ...
    KSR.uninstall()

`install()` puts the fake into `sys.modules["KSR"]` at once and returns it; leaving the
`with` block (or `uninstall()`) puts back whatever was there before.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

from tlsbridge.shared.addr import format_addr, parse_addr

__all__ = ["FakeKSR", "Reply", "install"]

Addr = tuple[str, int] | str

LOG_LEVELS = ("dbg", "info", "notice", "warn", "err", "crit")

# Pseudo-variables that describe one message; message() clears them all before setting new ones.
_MESSAGE_PVS = (
    "$pr", "$proto", "$Ri", "$Rp", "$si", "$sp", "$conid", "$tcp(c_si)", "$tcp(c_sp)",
    "$ru", "$du", "$rm", "$ci", "$fu", "$tu",
)


def _addr(value: Addr) -> tuple[str, int]:
    if isinstance(value, str):
        return parse_addr(value)
    host, port = value
    return str(host), int(port)


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply the script sent (KSR.sl), with the headers queued by append_to_reply."""

    code: int
    reason: str
    headers: tuple[str, ...] = ()
    via: str = "sl_send_reply"


class _PV:
    """KSR.pv over a plain dict: `KSR.pv.get("$si")` is `ksr.pvs["$si"]`, None when unset."""

    def __init__(self, store: dict[str, Any]) -> None:
        self._store = store

    def get(self, name: str) -> Any:
        return self._store.get(name)

    def gete(self, name: str) -> Any:
        value = self._store.get(name)
        return "" if value is None else value

    def getw(self, name: str) -> Any:
        value = self._store.get(name)
        return "<null>" if value is None else value

    def getvn(self, name: str, default: int) -> Any:
        value = self._store.get(name)
        return default if value is None else value

    def getvs(self, name: str, default: str) -> Any:
        value = self._store.get(name)
        return default if value is None else value

    def sets(self, name: str, value: str) -> int:
        self._store[name] = str(value)
        return 1

    def seti(self, name: str, value: int) -> int:
        self._store[name] = int(value)
        return 1

    def unset(self, name: str) -> int:
        self._store.pop(name, None)
        return 1

    def is_null(self, name: str) -> bool:
        return self._store.get(name) is None


class _HTable:
    """KSR.htable: one dict per table; a missing item reads as None, as in Kamailio."""

    def __init__(self, tables: dict[str, dict[str, Any]]) -> None:
        self._tables = tables

    def _table(self, table: str) -> dict[str, Any]:
        return self._tables.setdefault(table, {})

    def sht_get(self, table: str, key: str) -> Any:
        return self._tables.get(table, {}).get(key)

    def sht_gete(self, table: str, key: str) -> Any:
        value = self.sht_get(table, key)
        return "" if value is None else value

    def sht_is_null(self, table: str, key: str) -> int:
        return 1 if self.sht_get(table, key) is None else -1

    def sht_sets(self, table: str, key: str, value: str) -> int:
        self._table(table)[key] = str(value)
        return 1

    def sht_seti(self, table: str, key: str, value: int) -> int:
        self._table(table)[key] = int(value)
        return 1

    def sht_rm(self, table: str, key: str) -> int:
        self._tables.get(table, {}).pop(key, None)
        return 1

    def sht_reset(self, table: str) -> int:
        self._tables.get(table, {}).clear()
        return 1


class _Hdr:
    """KSR.hdr: records header changes; `get`/`is_present` read the headers given to message()."""

    def __init__(self, ksr: FakeKSR) -> None:
        self._ksr = ksr

    def append(self, text: str) -> int:
        self._ksr.added_headers.append(text)
        return 1

    def insert(self, text: str) -> int:
        self._ksr.added_headers.insert(0, text)
        return 1

    def remove(self, name: str) -> int:
        self._ksr.removed_headers.append(name)
        return 1

    def append_to_reply(self, text: str) -> int:
        self._ksr.reply_headers.append(text)
        return 1

    def is_present(self, name: str) -> int:
        return 1 if self.get(name) is not None else -1

    def get(self, name: str) -> str | None:
        wanted = name.lower()
        if wanted in (r.lower() for r in self._ksr.removed_headers):
            return None
        for key, value in self._ksr.headers.items():
            if key.lower() == wanted:
                return value
        return None


class _X:
    """KSR.x: `modf(name, *args)` calls are recorded in `ksr.modf_calls` and answer what
    `ksr.modf_results[name]` says (-1, Kamailio's "false", by default)."""

    def __init__(self, ksr: FakeKSR) -> None:
        self._ksr = ksr

    def modf(self, name: str, *args: str) -> int:
        self._ksr.modf_calls.append((name, *args))
        return self._ksr.modf_results.get(name, -1)


class _SL:
    """KSR.sl: replies are recorded in `ksr.replies`."""

    def __init__(self, ksr: FakeKSR) -> None:
        self._ksr = ksr

    def _reply(self, code: int, reason: str, via: str) -> int:
        self._ksr.replies.append(Reply(int(code), str(reason), tuple(self._ksr.reply_headers), via))
        return 1

    def sl_send_reply(self, code: int, reason: str) -> int:
        return self._reply(code, reason, "sl_send_reply")

    def send_reply(self, code: int, reason: str) -> int:
        return self._reply(code, reason, "send_reply")


class FakeKSR(types.ModuleType):
    """A stand-in for Kamailio's `KSR` module; inspect its lists and dicts in assertions.

    State: `pvs` (pseudo-variables), `htables` (table -> dict), `logs` ((level, text) pairs),
    `replies` (Reply), `added_headers`, `removed_headers`, `reply_headers`, `headers` (the
    current message's headers, for `KSR.hdr.get`), `advertised` (set_advertised_address and
    _port), `modf_calls` and `modf_results`
    (`KSR.x.modf`: cfg-only functions such as tcpops' `tcp_get_conid`). Modules that are not
    modelled raise an AttributeError naming them; add your own stub as an attribute
    (`ksr.tm = MyTm()`).
    """

    def __init__(self) -> None:
        super().__init__("KSR", "tlsbridge.kemi.testing fake of Kamailio's KSR module")
        self.pvs: dict[str, Any] = {}
        self.htables: dict[str, dict[str, Any]] = {}
        self.logs: list[tuple[str, str]] = []
        self.replies: list[Reply] = []
        self.added_headers: list[str] = []
        self.removed_headers: list[str] = []
        self.reply_headers: list[str] = []
        self.headers: dict[str, str] = {}
        self.modf_calls: list[tuple[str, ...]] = []
        self.modf_results: dict[str, int] = {}
        self.advertised: tuple[str | None, int | None] = (None, None)
        self.pv = _PV(self.pvs)
        self.htable = _HTable(self.htables)
        self.hdr = _Hdr(self)
        self.sl = _SL(self)
        self.x = _X(self)
        self._previous: Any = None
        self._installed = False

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes that do not exist: say what is missing.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"KSR.{name} is not modelled by tlsbridge.kemi.testing.FakeKSR; "
            f"set a stub yourself (ksr.{name} = ...)"
        )

    # -- logging ----------------------------------------------------------------------------

    def log(self, level: str, text: str) -> None:
        self.logs.append((level, text))

    def dbg(self, text: str) -> None:
        self.log("dbg", text)

    def info(self, text: str) -> None:
        self.log("info", text)

    def notice(self, text: str) -> None:
        self.log("notice", text)

    def warn(self, text: str) -> None:
        self.log("warn", text)

    def err(self, text: str) -> None:
        self.log("err", text)

    def crit(self, text: str) -> None:
        self.log("crit", text)

    def logged(self, level: str | None = None) -> list[str]:
        """The texts logged at `level` (all levels when None), oldest first."""
        return [text for lvl, text in self.logs if level is None or lvl == level]

    # -- core functions a script commonly calls ---------------------------------------------

    def set_advertised_address(self, host: str) -> int:
        self.advertised = (host or None, self.advertised[1])
        return 1

    def set_advertised_port(self, port: str) -> int:
        if not isinstance(port, str):  # as Kamailio's KEMI: "kemi-param-s() argument 1"
            raise TypeError(f"kemi-param-s() argument 1 must be str, not {type(port).__name__}")
        self.advertised = (self.advertised[0], int(port) if port else None)
        return 1

    def is_UDP(self) -> bool:  # Kamailio's spelling
        return (self.pvs.get("$pr") or "").lower() == "udp"

    def is_TCP(self) -> bool:
        return (self.pvs.get("$pr") or "").lower() == "tcp"

    def is_TLS(self) -> bool:
        return (self.pvs.get("$pr") or "").lower() == "tls"

    def is_method(self, method: str) -> bool:
        return self.pvs.get("$rm") == method

    # -- setting up a message ---------------------------------------------------------------

    def message(
        self,
        *,
        peer: Addr,
        hairpin: Addr | None = None,
        daemon: Addr | None = None,
        conid: int | None = None,
        proto: str | None = None,
        local: Addr | None = None,
        method: str = "OPTIONS",
        ruri: str = "sip:kamailio.example.net",
        headers: dict[str, str] | None = None,
        **pvs: Any,
    ) -> FakeKSR:
        """Make the pseudo-variables describe one received message (per-message state reset).

        Over a hairpin (`hairpin` given): `$pr` tcp, `$Ri:$Rp` = the hairpin listener,
        `$si:$sp` = `peer` (what the PROXY header declared), `$tcp(c_si):$tcp(c_sp)` = `daemon`
        (the daemon's side of the hairpin TCP connection), `$conid` = `conid`.

        Otherwise: `proto` (default udp) received on `local` (default 192.0.2.1:5060) from
        `peer`; for a stream protocol `$conid` and `$tcp(c_si/c_sp)` (= peer) are set too.

        Extra pseudo-variables can be given as a dict-splat: `**{"$fu": "sip:a@b"}`.
        """
        for name in _MESSAGE_PVS:
            self.pvs.pop(name, None)
        self.added_headers.clear()
        self.removed_headers.clear()
        self.reply_headers.clear()
        self.headers = dict(headers or {})
        peer_host, peer_port = _addr(peer)
        if hairpin is not None:
            if daemon is None or conid is None:
                raise ValueError("a message over a hairpin needs daemon= and conid=")
            if proto not in (None, "tcp"):
                raise ValueError("hairpins are plain TCP")
            proto = "tcp"
            local_host, local_port = _addr(hairpin)
            conn_host, conn_port = _addr(daemon)
        else:
            proto = (proto or "udp").lower()
            local_host, local_port = _addr(local or ("192.0.2.1", 5060))
            conn_host, conn_port = peer_host, peer_port
        self.pvs.update(
            {
                "$pr": proto,
                "$proto": proto,
                "$Ri": local_host,
                "$Rp": local_port,
                "$si": peer_host,
                "$sp": peer_port,
                "$rm": method,
                "$ru": ruri,
            }
        )
        if proto != "udp":
            if conid is None:
                raise ValueError(f"a message over {proto} needs conid=")
            self.pvs.update({"$conid": conid, "$tcp(c_si)": conn_host, "$tcp(c_sp)": conn_port})
        self.pvs.update(pvs)
        return self

    def source(self) -> str:
        """`$si:$sp` of the current message, in tlsbridge's address spelling."""
        return format_addr(str(self.pvs.get("$si")), int(self.pvs["$sp"]))

    # -- sys.modules ------------------------------------------------------------------------

    def uninstall(self) -> None:
        """Remove this fake from sys.modules["KSR"], restoring what was there before."""
        if not self._installed:
            return
        if sys.modules.get("KSR") is self:
            if self._previous is None:
                del sys.modules["KSR"]
            else:
                sys.modules["KSR"] = self._previous
        self._previous, self._installed = None, False

    def __enter__(self) -> FakeKSR:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def install(ksr: FakeKSR | None = None) -> FakeKSR:
    """Put `ksr` (a new FakeKSR by default) into sys.modules["KSR"] now and return it.

    Use it as a context manager to remove it again, or call `.uninstall()`.
    """
    ksr = ksr if ksr is not None else FakeKSR()
    if ksr._installed:
        raise RuntimeError("this FakeKSR is already installed")
    ksr._previous = sys.modules.get("KSR")
    sys.modules["KSR"] = ksr
    ksr._installed = True
    return ksr

