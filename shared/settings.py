"""What Kamailio's side needs of the daemon's TOML: where the hairpin and the endpoints are.

Kamailio may run as a user who cannot read the daemon's keys, so this reads only addresses.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlsbridge.shared.addr import TLS_DEFAULT_PORT, default_sni, format_addr, parse_addr
from tlsbridge.shared.factsmap import facts_map_of

DEFAULT_RUN_DIR = "/run/tlsbridge"


@dataclass(frozen=True, slots=True)
class Trunk:
    """A TLS peer Kamailio sends to: dialled prefixes or domains route there."""

    name: str
    host: str
    port: int
    sni: str | None
    profile: str = "default"
    prefixes: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    run_dir: Path
    hairpin: tuple[str, int]
    events_endpoint: str
    control_endpoint: str
    lookup_socket: str = ""  # the facts look-up by datagram (shared/lookup.py)
    facts_map: str = ""  # the facts in shared memory (shared/factsmap.py)
    # listener address -> the address TLS peers know it by (its `advertise`, else itself)
    tls_public: dict[str, str] = field(default_factory=dict)
    # where non-TLS peers reach Kamailio, for Record-Route across transports
    sip_address: str | None = None
    # one node of several sharing registrations (DMQ): TLS registrations carry a Path to it
    cluster: bool = False
    # what Kamailio's start-up does with an error in its cfg: "refuse" to start, or "warn"
    cfg_review: str = "refuse"
    trunks: dict[str, Trunk] = field(default_factory=dict)
    # WSS listeners (transport = "wss"): address -> the address browsers know it by, and
    # address -> the Origin values allowed (None: any). `tls_public` holds the TLS ones only.
    wss_public: dict[str, str] = field(default_factory=dict)
    wss_origins: dict[str, tuple[str, ...] | None] = field(default_factory=dict)


def run_dir_of(raw: dict[str, Any], base: Path) -> Path:
    daemon = raw.get("daemon", {})
    return (base / daemon.get("run_dir", DEFAULT_RUN_DIR)).resolve()


def endpoint_of(raw: dict[str, Any], key: str, run_dir: Path) -> str:
    """The ZeroMQ endpoint `key` ("events"/"control"): configured, or an ipc socket in run_dir."""
    value = raw.get("zmq", {}).get(key, f"ipc://{run_dir}/{key}.sock")
    return str(value).replace("{run_dir}", str(run_dir))


def lookup_socket_of(run_dir: Path) -> str:
    return str(run_dir / "lookup.sock")


def load_settings(path: str | Path) -> BridgeSettings:
    p = Path(path).resolve()
    raw = tomllib.loads(p.read_text())
    run_dir = run_dir_of(raw, p.parent)
    try:
        hairpin = parse_addr(raw["kamailio"]["hairpin"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{p}: key 'kamailio.hairpin' missing or bad: {exc}") from None
    tls_public, wss_public, wss_origins = {}, {}, {}
    for item in raw.get("listener", []):
        address = format_addr(*parse_addr(item["address"]))
        public = format_addr(*parse_addr(item.get("advertise", address)))
        if item.get("transport", "tls") == "wss":
            wss_public[address] = public
            origins = item.get("origins")
            wss_origins[address] = None if origins is None else tuple(str(o) for o in origins)
        else:
            tls_public[address] = public
    sip = raw["kamailio"].get("sip_address")
    return BridgeSettings(
        run_dir=run_dir,
        hairpin=hairpin,
        events_endpoint=endpoint_of(raw, "events", run_dir),
        control_endpoint=endpoint_of(raw, "control", run_dir),
        lookup_socket=lookup_socket_of(run_dir),
        facts_map=facts_map_of(run_dir),
        tls_public=tls_public,
        sip_address=format_addr(*parse_addr(sip, default_port=5060)) if sip else None,
        cluster=bool(raw["kamailio"].get("cluster", False)),
        cfg_review=str(raw["kamailio"].get("cfg_review", "refuse")),
        trunks=trunks_of(raw, p),
        wss_public=wss_public,
        wss_origins=wss_origins,
    )


TRUNK_KEYS = ("address", "sni", "client", "prefixes", "domains")


def trunks_of(raw: dict[str, Any], path: Path) -> dict[str, Trunk]:
    """`[trunk.NAME]` tables; raises ValueError naming the file and key."""
    trunks = {}
    for name, t in raw.get("trunk", {}).items():
        where = f"{path}: key 'trunk.{name}"
        if not isinstance(t, dict):
            raise ValueError(f"{where}' must be a table")
        unknown = sorted(set(t) - set(TRUNK_KEYS))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}': unknown key; known keys: "
                             f"{', '.join(TRUNK_KEYS)}")
        try:
            host, port = parse_addr(str(t["address"]), default_port=TLS_DEFAULT_PORT)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where}.address' missing or bad: {exc}") from None
        for key in ("prefixes", "domains"):
            if not isinstance(t.get(key, []), list):
                raise ValueError(f"{where}.{key}' must be a list of strings")
        trunks[name] = Trunk(
            name=name,
            host=host,
            port=port,
            sni=t.get("sni", default_sni(host)),
            profile=str(t.get("client", "default")),
            prefixes=tuple(str(x) for x in t.get("prefixes", [])),
            domains=tuple(str(x).lower() for x in t.get("domains", [])),
        )
    return trunks
