"""The daemon's one Config object, loaded from TOML and checked before anything starts."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlsbridge.shared.addr import TLS_DEFAULT_PORT, format_addr, parse_addr
from tlsbridge.shared.settings import DEFAULT_RUN_DIR, endpoint_of, run_dir_of, trunks_of

DEFAULT_CONFIG = "/etc/tlsbridge/tlsbridge.toml"
# optional_no_ca: ask for a certificate, accept any (pyopenssl and gnutls engines only)
VERIFY_MODES = ("off", "optional", "on", "optional_no_ca")
ENGINE_NAMES = ("openssl", "pyopenssl", "gnutls")
# What a listener carries: SIP over TLS, or SIP over secure WebSocket (RFC 7118).
TRANSPORTS = ("tls", "wss")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


# import-tls-cfg writes this where the operator must decide; a file that still has one is refused.
PLACEHOLDER = "<set me:"


class ConfigError(Exception):
    """A configuration that cannot run; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class ServerProfile:
    name: str
    certificate: Path
    private_key: Path
    ca_list: Path | None = None
    verify_client: str = "off"
    verify_depth: int = 9
    min_version: str = "TLSv1.2"
    max_version: str = "TLSv1.3"
    ciphers: str | None = None  # TLS 1.2 cipher list (OpenSSL syntax)
    alpn: tuple[str, ...] = ()
    engine: str = "openssl"
    # SNI names this profile serves on listeners that list it: "sip.example.com" or
    # "*.example.com" (one label).
    server_names: tuple[str, ...] = ()
    private_key_password: str | None = field(default=None, repr=False)
    ca_path: Path | None = None  # a c_rehash'ed directory of CA certificates
    crl: Path | None = None  # PEM CRLs; peers' certificates are checked against them
    tls13_ciphersuites: str | None = None  # e.g. "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
    groups: str | None = None  # key exchange groups, e.g. "X25519:P-256"


@dataclass(frozen=True, slots=True)
class ClientProfile:
    """How we originate TLS: our identity (optional) and how we check the server."""

    name: str
    certificate: Path | None = None
    private_key: Path | None = None
    ca_list: Path | None = None  # None: the system's trust store
    verify_server: bool = True
    # RFC 5922: the SIP domain is checked against the certificate. None: the SNI / host name.
    verify_name: str | None = None
    min_version: str = "TLSv1.2"
    max_version: str = "TLSv1.3"
    ciphers: str | None = None
    engine: str = "openssl"
    private_key_password: str | None = field(default=None, repr=False)
    ca_path: Path | None = None
    crl: Path | None = None
    verify_depth: int = 9
    tls13_ciphersuites: str | None = None
    groups: str | None = None  # key exchange groups offered, e.g. "X25519:P-256"
    # Servers ("ip:port") this profile is used for when a connect names no profile.
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Outbound:
    connect_timeout: float = 4.0  # TCP connect + handshake + hairpin; keep below tm's fr_timer
    idle_timeout: float = 600.0  # an outbound connection with no traffic this long is closed


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    profile: str
    advertise: str | None = None  # the public address, when it is not the bound one
    engine: str | None = None  # overrides the profile's engine
    sni_profiles: tuple[str, ...] = ()  # profiles chosen by their server_names
    strict_sni: bool = False  # refuse a handshake whose SNI no profile serves
    # "tls": SIP over TLS. "wss": SIP over secure WebSocket (browsers). The daemon treats both
    # alike (TLS, hairpin, facts, events); Kamailio's xhttp and websocket modules take the
    # upgrade on the hairpin, and the KEMI module applies `origins` there.
    transport: str = "tls"
    origins: tuple[str, ...] | None = None  # wss: the Origin values allowed; None: any
    # Formatted once: every connection's events name its listener.
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", format_addr(self.host, self.port))


@dataclass(frozen=True, slots=True)
class Hairpin:
    host: str
    port: int
    proxy_protocol: int = 1
    source_ip: str = "127.0.0.1"
    connect_timeout: float = 5.0
    cfg: Path | None = None  # Kamailio's kamailio.cfg, reviewed at start for what the bridge needs


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    run_dir: Path
    hairpin: Hairpin
    listeners: tuple[Listener, ...]
    profiles: dict[str, ServerProfile]
    events_endpoint: str
    control_endpoint: str
    clients: dict[str, ClientProfile] = field(default_factory=dict)
    outbound: Outbound = field(default_factory=Outbound)
    events_hwm: int = 100_000
    log_level: str = "info"
    handshake_timeout: float = 10.0
    max_buffer: int = 256 * 1024
    watch_files: bool = False  # reload when the configuration or a certificate changes
    keylog_file: Path | None = None  # TLS key log (NSS format) for debugging; off unless set
    max_connections: int = 0  # 0: as many as the open-files limit allows
    max_per_ip: int = 0  # 0: unlimited
    metrics: tuple[str, int] | None = None  # Prometheus endpoint; off unless set
    workers: int = 1  # processes serving TLS; more than one adds a supervisor
    cert_expiry_days: float = 30.0  # publish cert.expiring this many days before notAfter


class _Section:
    """Typed access to one TOML table; every error names file and dotted key."""

    def __init__(self, path: Path, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: '{prefix}' must be a table")
        self.path, self.prefix, self.data = path, prefix, data

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{self._key(key)}': {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        value = self.data.get(key)
        if isinstance(value, str) and value.startswith(PLACEHOLDER):
            raise self.fail(key, f"a placeholder ({value}): set it")
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be a {name}, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[Any, ...], default: Any) -> Any:
        value = self.data.get(key, default)
        # `True == 1` and `2.0 == 2`: compare types too, or `proxy_protocol = true` passes.
        if not any(value == c and type(value) is type(c) for c in choices):
            raise self.fail(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value

    def positive(self, key: str, kind: type, default: Any) -> Any:
        value = self.get(key, kind, default)
        if value <= 0:
            raise self.fail(key, f"must be > 0, got {value!r}")
        return value

    def file(self, key: str, base: Path, required: bool = True) -> Path | None:
        raw = self.get(key, str, ... if required else None)
        if raw is None:
            return None
        p = (base / raw).resolve()
        if not p.is_file():
            raise self.fail(key, f"file {p} does not exist or is not a regular file")
        if not os.access(p, os.R_OK):
            raise self.fail(key, f"file {p} is not readable")
        return p

    def directory(self, key: str, base: Path) -> Path | None:
        raw = self.get(key, str, None)
        if raw is None:
            return None
        p = (base / raw).resolve()
        if not p.is_dir():
            raise self.fail(key, f"directory {p} does not exist")
        return p

    def password(self, base: Path) -> str | None:
        """`private_key_password`, or the first line of `private_key_password_file`."""
        if "private_key_password" in self.data and "private_key_password_file" in self.data:
            raise self.fail("private_key_password", "give the password or its file, not both")
        path = self.file("private_key_password_file", base, required=False)
        if path is None:
            return self.get("private_key_password", str, None)
        lines = path.read_text().splitlines()
        return lines[0] if lines else ""

    def names(self, key: str) -> tuple[str, ...]:
        items = self.get(key, list, [])
        if not all(isinstance(i, str) and i for i in items):
            raise self.fail(key, "must be a list of non-empty strings")
        return tuple(items)

    def only(self, *keys: str) -> None:
        """A misspelt key must not be silently ignored."""
        unknown = sorted(set(self.data) - set(keys))
        if unknown:
            raise self.fail(unknown[0], f"unknown key; known keys: {', '.join(keys)}")

    def address(self, key: str, default: Any = ...) -> tuple[str, int]:
        raw = self.get(key, str, default)
        try:
            return parse_addr(raw)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def sub(self, key: str, default: Any = ...) -> _Section:
        return _Section(self.path, self._key(key), self.get(key, dict, default))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a TOML file; raises ConfigError with a message an operator can act on."""
    p = Path(path).resolve()
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return _build(p, _Section(p, "", raw))


def _build(path: Path, root: _Section) -> Config:
    base = path.parent
    daemon = root.sub("daemon", {})
    daemon.only("workers", "run_dir", "log_level", "handshake_timeout", "max_buffer",
                "watch_files", "cert_expiry_days", "keylog_file")
    daemon.get("run_dir", str, DEFAULT_RUN_DIR)
    run_dir = run_dir_of(root.data, base)
    profiles = _profiles(root, base)
    listeners = _listeners(root, profiles)
    kam = root.sub("kamailio")
    kam.only("hairpin", "proxy_protocol", "source_ip", "connect_timeout", "sip_address", "cfg",
             "cluster", "cfg_review")
    # read by Kamailio's side (shared/settings.py)
    kam.get("cluster", bool, False)
    kam.choice("cfg_review", ("refuse", "warn"), "refuse")
    host, port = kam.address("hairpin")
    hairpin = Hairpin(
        host=host,
        port=port,
        proxy_protocol=kam.choice("proxy_protocol", (1, 2), 1),
        source_ip=kam.get("source_ip", str, "127.0.0.1"),
        connect_timeout=kam.positive("connect_timeout", float, 5.0),
        cfg=kam.file("cfg", base, required=False),
    )
    if "sip_address" in kam.data:
        kam.address("sip_address")
    zmq = root.sub("zmq", {})
    zmq.only("events", "control", "events_hwm")
    out = root.sub("outbound", {})
    out.only("connect_timeout", "idle_timeout")
    limits = root.sub("limits", {})
    limits.only("max_connections", "max_per_ip")
    clients = _clients(root, base)
    try:
        trunks = trunks_of(root.data, path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for trunk in trunks.values():
        if trunk.profile not in clients:
            raise ConfigError(f"{path}: key 'trunk.{trunk.name}.client': "
                              f"no [client.{trunk.profile}] table")
    root.only("daemon", "limits", "kamailio", "zmq", "listener", "profile", "outbound",
              "client", "trunk", "metrics")
    return Config(
        clients=clients,
        outbound=Outbound(
            connect_timeout=out.positive("connect_timeout", float, 4.0),
            idle_timeout=out.positive("idle_timeout", float, 600.0),
        ),
        path=path,
        run_dir=run_dir,
        hairpin=hairpin,
        listeners=listeners,
        profiles=profiles,
        events_endpoint=_endpoint(zmq, "events", run_dir),
        control_endpoint=_endpoint(zmq, "control", run_dir),
        events_hwm=zmq.positive("events_hwm", int, 100_000),
        log_level=daemon.choice("log_level", ("debug", "info", "warning", "error"), "info"),
        handshake_timeout=daemon.positive("handshake_timeout", float, 10.0),
        max_buffer=daemon.positive("max_buffer", int, 256 * 1024),
        watch_files=daemon.get("watch_files", bool, False),
        keylog_file=(base / daemon.get("keylog_file", str)).resolve()
        if "keylog_file" in daemon.data else None,
        max_connections=limits.get("max_connections", int, 0),
        max_per_ip=limits.get("max_per_ip", int, 0),
        metrics=_metrics(root.sub("metrics", {})),
        workers=_workers(daemon),
        cert_expiry_days=daemon.positive("cert_expiry_days", float, 30.0),
    )


def _endpoint(zmq: _Section, key: str, run_dir: Path) -> str:
    zmq.get(key, str, "")
    value = endpoint_of({"zmq": zmq.data}, key, run_dir)
    if value.startswith("tcp://"):
        # An unauthenticated tcp endpoint lets anyone on the network kill connections.
        raise zmq.fail(key, "tcp:// endpoints need CURVE keys, not supported yet; use ipc://")
    if not value.startswith(("ipc://", "inproc://")):
        raise zmq.fail(key, f"must be an ipc:// endpoint, got {value!r}")
    return value


_PROFILE_KEYS = (
    "certificate", "private_key", "private_key_password", "private_key_password_file",
    "ca_list", "ca_path", "crl", "verify_client", "verify_depth", "min_version", "max_version",
    "ciphers", "tls13_ciphersuites", "groups", "alpn", "engine", "server_names",
)
_CLIENT_KEYS = (
    "certificate", "private_key", "private_key_password", "private_key_password_file",
    "ca_list", "ca_path", "crl", "verify_server", "verify_name", "verify_depth", "min_version",
    "max_version", "ciphers", "tls13_ciphersuites", "groups", "engine", "destinations",
)


def _workers(daemon: _Section) -> int:
    value = daemon.get("workers", (int, str), 1)
    if value == "auto":
        return os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 256:
        raise daemon.fail("workers", f"must be 1..256 or \"auto\", got {value!r}")
    return value


def _metrics(sec: _Section) -> tuple[str, int] | None:
    sec.only("listen", "allow_remote")
    if "listen" not in sec.data:
        return None
    host, port = sec.address("listen")
    remote = sec.get("allow_remote", bool, False)
    if not remote and host not in ("127.0.0.1", "::1", "localhost"):
        raise sec.fail("listen", f"{host} is not loopback; set allow_remote = true to expose "
                       "metrics beyond this host")
    return host, port


def _addresses(sec: _Section, key: str) -> tuple[str, ...]:
    items = sec.names(key)
    for item in items:
        try:
            parse_addr(item, default_port=TLS_DEFAULT_PORT)
        except ValueError as exc:
            raise sec.fail(key, str(exc)) from None
    return items


def _versions(sec: _Section) -> tuple[str, str]:
    min_v = sec.choice("min_version", TLS_VERSIONS, "TLSv1.2")
    max_v = sec.choice("max_version", TLS_VERSIONS, "TLSv1.3")
    if TLS_VERSIONS.index(min_v) > TLS_VERSIONS.index(max_v):
        raise sec.fail("min_version", f"{min_v} is above max_version {max_v}")
    return min_v, max_v


def _clients(root: _Section, base: Path) -> dict[str, ClientProfile]:
    table = root.sub("client", {})
    clients = {}
    for name in table.data:
        sec = table.sub(name)
        sec.only(*_CLIENT_KEYS)
        min_v, max_v = _versions(sec)
        cert = sec.file("certificate", base, required=False)
        key = sec.file("private_key", base, required=False)
        if (cert is None) != (key is None):
            raise sec.fail("private_key" if key is None else "certificate",
                           "certificate and private_key go together")
        clients[name] = ClientProfile(
            name=name,
            certificate=cert,
            private_key=key,
            ca_list=sec.file("ca_list", base, required=False),
            verify_server=sec.get("verify_server", bool, True),
            verify_name=sec.get("verify_name", str, None),
            min_version=min_v,
            max_version=max_v,
            ciphers=sec.get("ciphers", str, None),
            engine=sec.choice("engine", ENGINE_NAMES, "openssl"),
            private_key_password=sec.password(base),
            ca_path=sec.directory("ca_path", base),
            crl=sec.file("crl", base, required=False),
            verify_depth=sec.positive("verify_depth", int, 9),
            tls13_ciphersuites=sec.get("tls13_ciphersuites", str, None),
            groups=sec.get("groups", str, None),
            destinations=tuple(format_addr(*parse_addr(d, default_port=TLS_DEFAULT_PORT))
                               for d in _addresses(sec, "destinations")),
        )
    # Without configuration: no client certificate, servers verified against the system CAs.
    clients.setdefault("default", ClientProfile(name="default"))
    return clients


def _profiles(root: _Section, base: Path) -> dict[str, ServerProfile]:
    table = root.sub("profile")
    profiles = {}
    for name in table.data:
        sec = table.sub(name)
        sec.only(*_PROFILE_KEYS)
        min_v, max_v = _versions(sec)
        verify = sec.choice("verify_client", VERIFY_MODES, "off")
        ca_list = sec.file("ca_list", base, required=False)
        ca_path = sec.directory("ca_path", base)
        if verify not in ("off", "optional_no_ca") and ca_list is None and ca_path is None:
            raise sec.fail("ca_list", f"(or ca_path) is required when verify_client = {verify!r}")
        alpn = sec.get("alpn", list, [])
        profiles[name] = ServerProfile(
            name=name,
            certificate=sec.file("certificate", base),
            private_key=sec.file("private_key", base),
            ca_list=ca_list,
            verify_client=verify,
            verify_depth=sec.positive("verify_depth", int, 9),
            min_version=min_v,
            max_version=max_v,
            ciphers=sec.get("ciphers", str, None),
            alpn=tuple(str(a) for a in alpn),
            engine=sec.choice("engine", ENGINE_NAMES, "openssl"),
            server_names=tuple(n.lower() for n in sec.names("server_names")),
            private_key_password=sec.password(base),
            ca_path=ca_path,
            crl=sec.file("crl", base, required=False),
            tls13_ciphersuites=sec.get("tls13_ciphersuites", str, None),
            groups=sec.get("groups", str, None),
        )
    if not profiles:
        raise root.fail("profile", "at least one [profile.NAME] table is required")
    return profiles


def _listeners(root: _Section, profiles: dict[str, ServerProfile]) -> tuple[Listener, ...]:
    items = root.get("listener", list)
    if not items:
        raise root.fail("listener", "at least one [[listener]] is required")
    out = []
    for i, item in enumerate(items):
        sec = _Section(root.path, f"listener[{i}]", item)
        host, port = sec.address("address")
        profile = sec.get("profile", str, "default")
        if profile not in profiles:
            raise sec.fail("profile", f"no [profile.{profile}] table")
        sec.only("address", "profile", "profiles", "strict_sni", "advertise", "engine",
                 "transport", "origins")
        transport = sec.choice("transport", TRANSPORTS, "tls")
        origins = sec.names("origins") if "origins" in sec.data else None
        if origins is not None and transport != "wss":
            raise sec.fail("origins", 'only a listener with transport = "wss" has origins')
        advertise = format_addr(*sec.address("advertise")) if "advertise" in sec.data else None
        engine = sec.choice("engine", (*ENGINE_NAMES, None), None)
        sni_profiles = sec.names("profiles")
        for name in sni_profiles:
            if name not in profiles:
                raise sec.fail("profiles", f"no [profile.{name}] table")
            if not profiles[name].server_names:
                raise sec.fail("profiles", f"profile {name!r} has no server_names to match")
        out.append(Listener(host, port, profile, advertise, engine, sni_profiles,
                            sec.get("strict_sni", bool, False), transport, origins))
    return tuple(out)
