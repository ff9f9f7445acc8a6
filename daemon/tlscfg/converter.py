"""A parsed tls.cfg to a tlsbridge configuration (a `Document`): the tables of its sections, the
listeners, the client destinations, and every warning in file order.

Kamailio's semantics are kept: a missing default profile is Kamailio's built-in one, a profile's
missing keys take Kamailio's built-in defaults, an address without outbound SNI uses its newest
client profile. `profiles` maps one section, `listeners` groups the server tables; this module
names the tables and puts the whole file together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace

from tlsbridge.daemon.tlscfg.document import Document, Table
from tlsbridge.daemon.tlscfg.findings import Findings
from tlsbridge.daemon.tlscfg.listeners import Listeners
from tlsbridge.daemon.tlscfg.model import Section, TlsCfg
from tlsbridge.daemon.tlscfg.profiles import Profiles
from tlsbridge.daemon.tlscfg.site import Site, placeholder
from tlsbridge.shared.addr import format_addr, parse_addr

__all__ = ["convert_model"]


def convert_model(cfg: TlsCfg, site: Site) -> Document:
    """The tlsbridge configuration of `cfg`. ValueError for a `site` that is not valid,
    TlsCfgError for profiles no engine can serve on one listener."""
    tls_port = site.tls_port
    if not isinstance(tls_port, int) or isinstance(tls_port, bool) or not 0 < tls_port < 65536:
        raise ValueError(f"tls_port must be a port number, got {tls_port!r}")
    parse_addr(site.hairpin)  # ValueError for a bad hairpin
    if site.sip_address:
        parse_addr(site.sip_address, default_port=5060)
    return _Converter(cfg, site).run()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_") or "profile"


def _names(sections: Iterable[Section], name_of: Callable[[Section], str],
           taken: set[str]) -> dict[Section, str]:
    """A unique table name per section: name_of's, else with a _2, _3... suffix."""
    out: dict[Section, str] = {}
    for sec in sections:
        base = name_of(sec)
        name, n = base, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        out[sec] = name
    return out


def _server_name_of(sec: Section) -> str:
    if sec.server_name:
        return _slug(sec.server_name)
    return f"srv_{_slug(sec.host or '')}_{sec.port}"


def _client_name_of(sec: Section) -> str:
    # server_id first: scripts that set $xavp(tls=>server_id) can pass it as the profile.
    server_id = sec.get("server_id")
    if server_id:
        return server_id if re.fullmatch(r"[A-Za-z0-9_.-]+", server_id) else _slug(server_id)
    if sec.kind == "any":
        return _slug(sec.server_name or "")
    return f"cli_{_slug(sec.host or '')}_{sec.port}"


class _Converter:
    def __init__(self, cfg: TlsCfg, site: Site) -> None:
        self.cfg, self.site, self.tls_port = cfg, site, site.tls_port
        self.findings = Findings(cfg)
        self.warn = self.findings.warn
        self.profiles = Profiles(self.findings)

    def run(self) -> Document:
        secs = self.cfg.sections
        src = self.cfg.source
        for sec in secs:
            for old in sec.replaced:
                self.warn(sec, old.key, f"set again (line {old.line} is overridden): the last "
                          "value counts")
        srv_default = next((s for s in secs if s.role == "server" and s.kind == "default"), None)
        cli_default = next((s for s in secs if s.role == "client" and s.kind == "default"), None)
        if srv_default is None:
            srv_default = Section("server", "default", 0, src)
            self.warn(srv_default, None, "missing: Kamailio builds it from built-in defaults "
                      "(certificate and private_key cert.pem beside kamailio.cfg, TLSv1+, no "
                      "client verification), and so does this conversion")
        if cli_default is None:
            cli_default = Section("client", "default", 0, src)
            self.warn(cli_default, None, "missing: Kamailio's built-in default verifies no "
                      "server certificate, while tlsbridge's default [client.default] does; "
                      "written with verify_server = false to keep Kamailio's behaviour")

        servers = [s for s in secs if s.role == "server" and s.kind != "default"]
        names = _names(servers, _server_name_of, {"default"})
        default = self.profiles.server_table(srv_default, "default")
        tables = {s: self.profiles.server_table(s, names[s]) for s in servers}
        listeners = Listeners(self.cfg, self.site, self.findings).build(default, tables)

        clients = [s for s in secs if s.role == "client" and s.kind != "default"]
        cnames = _names(clients, _client_name_of, {"default"})
        dest = self._destinations(clients)
        ctables = [self.profiles.client_table(cli_default, "default", None)]
        ctables += [self.profiles.client_table(s, cnames[s], dest.get(s)) for s in clients]

        def noted(table: Table) -> Table:
            return replace(table, notes=self.findings.notes(table.section))

        site = self.site
        return Document(
            source=src,
            run_dir=site.run_dir or placeholder("a directory on tmpfs Kamailio can read, e.g. "
                                                "/run/tlsbridge"),
            hairpin=site.hairpin,
            sip_address=site.sip_address or placeholder("where UDP peers reach Kamailio, e.g. "
                                                        "192.0.2.10:5060"),
            listeners=listeners,
            profiles=tuple(noted(t) for t in (default, *tables.values())),
            clients=tuple(noted(t) for t in ctables),
            notes=self.cfg.warnings,
            relative_paths=self.profiles.relative_paths,
            warnings=tuple(self.findings.in_order()),
        )

    def _destinations(self, clients: list[Section]) -> dict[Section, str]:
        """The address each client section is used for when a connect names no profile."""
        # Without an outbound SNI Kamailio takes the newest profile of an address.
        owner: dict[str, Section] = {}
        for sec in clients:
            if sec.kind == "address":
                port = sec.port or self.tls_port
                if sec.port == 0:
                    self.warn(sec, None, f"port 0 matches every port of {sec.host} in Kamailio;"
                              f" tlsbridge's destinations take one: {self.tls_port}")
                owner[format_addr(sec.host or "", port)] = sec
        return {sec: addr for addr, sec in owner.items()}
