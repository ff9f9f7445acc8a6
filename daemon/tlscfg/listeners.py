"""Server tables to [[listener]]s, as Kamailio chooses a server profile (tls_domain.c): one
listener per address, the profiles it offers by SNI in Kamailio's order, the catch-all listener
of [server:default], and the engine a listener needs to switch its profiles by SNI."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tlsbridge.daemon.engines.registry import FIXED_BEFORE_SNI
from tlsbridge.daemon.tlscfg.document import Listener, Table
from tlsbridge.daemon.tlscfg.errors import TlsCfgError
from tlsbridge.daemon.tlscfg.findings import Findings
from tlsbridge.daemon.tlscfg.model import DOMAIN_AND_SUBDOMAINS, SUBDOMAINS, Section, TlsCfg
from tlsbridge.daemon.tlscfg.site import Site, placeholder
from tlsbridge.shared.addr import format_addr, parse_addr

__all__ = ["Listeners"]


@dataclass(slots=True)
class _Draft:
    """A listener while the checks add notes and the engine choice its engine."""

    address: str
    profile: str
    sni: list[str]
    section: Section
    origin: str
    commented: bool = False
    notes: list[str] = field(default_factory=list)
    engine: str | None = None
    engine_why: str = ""

    def freeze(self) -> Listener:
        return Listener(self.address, self.profile, tuple(self.sni), self.section, self.origin,
                        self.commented, tuple(self.notes), self.engine, self.engine_why)


class Listeners:
    """Makes the listeners of a tls.cfg's server tables; warns through `findings`."""

    def __init__(self, cfg: TlsCfg, site: Site, findings: Findings) -> None:
        self.cfg, self.site, self.tls_port = cfg, site, site.tls_port
        self.warn = findings.warn

    def build(self, default: Table, tables: dict[Section, Table]) -> tuple[Listener, ...]:
        """The listeners of the server sections (`tables`) and of [server:default]
        (`default`); TlsCfgError when no engine can switch a listener's profiles by SNI."""
        out = self._listeners(default, tables)
        by_name = {t.name: t for t in (default, *tables.values())}
        for lst in out:
            self._engine_for(lst, by_name)
        return tuple(lst.freeze() for lst in out)

    def _listeners(self, default: Table, tables: dict[Section, Table]) -> list[_Draft]:
        secs = [s for s in self.cfg.sections if s.role == "server" and s.kind != "default"]
        anys = [s for s in secs if s.kind == "any"]
        groups: dict[str, list[Section]] = {}
        for sec in secs:
            if sec.kind != "address":
                continue
            port = sec.port or self.tls_port
            if sec.port == 0:
                self.warn(sec, None, f"port 0 matches every port of {sec.host} in Kamailio; "
                          f"tlsbridge listens on {sec.host} port {self.tls_port} only")
            groups.setdefault(format_addr(sec.host or "", port), []).append(sec)
        out: list[_Draft] = []
        for address, group in groups.items():
            last = group[-1]
            origin = f"{last.title}: its own listener"
            if last.server_name is None:  # alone, unless port 0 met the same address
                out.append(_Draft(address, tables[last].name, [], last, origin))
                for other in group[:-1]:
                    self.warn(other, None, f"is never used: {last.title} (line {last.line}) "
                              f"serves {address} whatever the SNI")
                if anys:
                    self.warn(last, None, "has no server_name, so Kamailio never looks at SNI on "
                              f"{address} and the [server:any] profiles are not used there; "
                              "neither does tlsbridge")
                continue
            # Kamailio searches its list newest first, a name or an `any` name, else default.
            order = [s for s in reversed(secs) if s in group or s.kind == "any"]
            out.append(_Draft(address, tables[last].name, [tables[s].name for s in order],
                                 last, origin))
            self.warn(last, "server_name", f"Kamailio serves clients of {address} that send no "
                      "SNI with this profile (the last for the address) and those whose SNI "
                      "matches no server_name with [server:default]; tlsbridge serves both "
                      "with this profile")
        address = format_addr(self.site.listen_ip, self.tls_port) if self.site.listen_ip \
            else f"{placeholder('the IP the daemon listens on for TLS, e.g. 192.0.2.10')}:" \
                 f"{self.tls_port}"
        catch_all = _Draft(address, default.name,
                              [tables[s].name for s in reversed(anys)], default.section,
                              "[server:default]: Kamailio's TLS sockets without a profile of "
                              "their own (bind it to kamailio.cfg's listen=tls: addresses)")
        if any(parse_addr(lst.address)[1] == self.tls_port for lst in out):
            self.warn(default.section, None, f"Kamailio uses it on every TLS socket without its "
                      f"own [server:IP:PORT] profile; port {self.tls_port} is taken by address "
                      "listeners, so its listener is left commented out: add one per other "
                      "listen=tls: socket of kamailio.cfg")
            catch_all.address, catch_all.commented = format_addr("192.0.2.1", self.tls_port), True
        out.append(catch_all)
        used = {n for lst in out if not lst.commented for n in lst.sni}
        for sec in anys:
            if tables[sec].name not in used:
                self.warn(sec, None, "is offered on no listener (see the warnings about the "
                          "listeners)")
        by_name = {t.name: t for t in (default, *tables.values())}
        for lst in out:
            self._check_listener(lst, by_name)
        return out

    def _check_listener(self, lst: _Draft, by_name: dict[str, Table]) -> None:
        if not lst.sni:
            return
        base = by_name[lst.profile]
        sni = [by_name[n] for n in lst.sni]
        # Each engine settles client verification before it sees the name.
        verification = ("verify_client", "crl")
        odd = [t.name for t in sni
               if [t.get(k) for k in verification] != [base.get(k) for k in verification]]
        if odd:
            self.warn(lst.section, None, f"listener {lst.address}: profiles {', '.join(odd)} "
                      f"verify clients (verify_client, crl) unlike its default profile "
                      f"{base.name!r}: Kamailio switches this by SNI, tlsbridge's openssl "
                      "engine cannot and refuses to start; give them the same verification or "
                      "a listener of their own", lst.notes)
        other = [t.name for t in (base, *sni) if t.get("engine")]
        if other:
            self.warn(lst.section, None, f"listener {lst.address}: profiles {', '.join(other)} "
                      "need engine pyopenssl (verify_client optional_no_ca) but choosing "
                      "profiles by SNI needs engine openssl", lst.notes)
        # Kamailio takes the first profile whose name or subdomains match; tlsbridge prefers an
        # exact name to a wildcard whatever the order.
        for i, first in enumerate(sni):
            mode = first.section.get("server_name_mode")
            if mode not in (SUBDOMAINS, DOMAIN_AND_SUBDOMAINS):
                continue
            parent = (first.section.server_name or "").lower()
            for later in sni[i + 1:]:
                name = (later.section.server_name or "").lower()
                if later.section.get("server_name_mode") != SUBDOMAINS \
                        and name.endswith("." + parent):
                    self.warn(later.section, "server_name", f"on {lst.address} Kamailio serves "
                              f"{name} with {first.section.title} (line {first.section.line}), "
                              "which comes first in its order and matches subdomains; "
                              "tlsbridge prefers the exact name and serves it with this profile")

    def _engine_for(self, lst: _Draft, tables: dict[str, Table]) -> None:
        """The first engine that can switch, by SNI, everything the listener's profiles
        differ in (each engine settles some keys before it sees the name)."""
        if not lst.sni:
            return
        profiles = [tables[lst.profile], *(tables[n] for n in lst.sni)]
        values = [{e.key: e.value for e in t.entries} for t in profiles]

        def differing(keys: Iterable[str]) -> list[str]:
            return sorted(k for k in set(keys) if len({repr(v.get(k)) for v in values}) > 1)

        # optional_no_ca already asked for pyopenssl: openssl cannot do it.
        forced = any(t.get("engine") for t in profiles)
        for engine, fixed in FIXED_BEFORE_SNI.items():  # openssl first: the default
            if (engine == "openssl" and forced) or differing(fixed):
                continue
            if engine != "openssl":
                lst.engine = engine
                lst.engine_why = f"switches {', '.join(differing(k for v in values for k in v))}"\
                                 " by SNI"
            return
        why = "; ".join(f"{engine} {', '.join(differing(fixed))}"
                        for engine, fixed in FIXED_BEFORE_SNI.items())
        raise TlsCfgError(lst.section.source, lst.section.line, 0,
                          f"{lst.section.title}: no engine can switch the profiles of "
                          f"{lst.address} by SNI; each settles keys in which they differ before "
                          f"it sees the name ({why}): give them a listener each")

