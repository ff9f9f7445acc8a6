"""One tls.cfg section to one tlsbridge table: a server section to a [profile.*], a client
section to a [client.*], each key mapped as Kamailio applied it (its built-in defaults for what
the section leaves out), with a warning for what does not carry over."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlsbridge.daemon.tlscfg.document import Entry, Table
from tlsbridge.daemon.tlscfg.findings import Findings
from tlsbridge.daemon.tlscfg.model import DOMAIN_AND_SUBDOMAINS, SUBDOMAINS, Section

__all__ = ["Profiles"]

# Kamailio's built-in defaults for what a profile leaves out (srv_defaults and cli_defaults in
# tls_mod.c): with a tls.cfg, profiles inherit from these, never from [server:default] and never
# from the modparams.
_DEFAULT_CERT = "cert.pem"
_DEFAULT_METHOD = "TLSv1+"

_RANGES: dict[str, tuple[str, str]] = {
    "TLSv1.2": ("TLSv1.2", "TLSv1.2"),
    "TLSv1.2+": ("TLSv1.2", "TLSv1.3"),
    "TLSv1.3": ("TLSv1.3", "TLSv1.3"),
    "TLSv1.3+": ("TLSv1.3", "TLSv1.3"),
}
_OLD_METHODS = {
    "SSLv2": "SSLv2 only",
    "SSLv3": "SSLv3 only",
    "SSLv23": "every version the OpenSSL build allows (SSLv3, TLS 1.0 to 1.3)",
    "TLSv1": "TLS 1.0 only",
    "TLSv1+": "TLS 1.0 and later",
    "TLSv1.1": "TLS 1.1 only",
    "TLSv1.1+": "TLS 1.1 and later",
}
_HSM_PREFIXES = ("/engine:", "/uri:")  # private keys in an HSM (tls_openssl.h)
_VERIFY_KEYS = ("verify_certificate", "require_certificate", "verify_client")


@dataclass(slots=True)
class _Draft:
    """A table while its entries are being set, in the order they are written."""

    kind: Literal["profile", "client"]
    name: str
    section: Section
    entries: list[Entry] = field(default_factory=list)

    def set(self, key: str, value: Any, comment: str = "") -> None:
        self.entries.append(Entry(key, value, comment))

    def freeze(self) -> Table:
        return Table(self.kind, self.name, self.section, tuple(self.entries))


class Profiles:
    """Makes the tables; warns through `findings`. `relative_paths` tells whether a path it
    wrote is relative (the renderer then says relative to what)."""

    def __init__(self, findings: Findings) -> None:
        self.warn = findings.warn
        self.relative_paths = False

    @staticmethod
    def _said(sec: Section, *keys: str) -> str:
        """`verify_certificate = yes, require_certificate = no`: the source of a value."""
        return ", ".join(f"{sec.settings[k].spelling} = {sec.settings[k].text}"
                         for k in keys if k in sec.settings)

    def _path(self, table: _Draft, key: str) -> None:
        """Write the path of `key` as the section gives it, warning about what tlsbridge
        reads differently and about a file that is not there."""
        sec = table.section
        value = sec.get(key)
        if value is None:
            return
        if key == "private_key" and value.startswith(_HSM_PREFIXES):
            self.warn(sec, key, f"{value!r} is a key in an HSM (engine or provider URI); "
                      "tlsbridge reads private keys from PEM files only: export it or point "
                      "private_key at a PEM file")
        elif value.startswith("."):
            self.warn(sec, key, f"{value!r}: Kamailio reads paths starting with '.' relative to "
                      "its working directory; tlsbridge reads them relative to this "
                      "configuration file's directory")
            self.relative_paths = True
        elif not value.startswith("/"):
            self.relative_paths = True
        self._exists(sec, key, value)
        table.set(key, value)

    def _exists(self, sec: Section, key: str, value: str) -> None:
        base = Path(sec.source).parent if Path(sec.source).is_file() else None
        if base is None or value.startswith(_HSM_PREFIXES):
            return
        path = base / value
        if key == "ca_path" and not path.is_dir():
            self.warn(sec, key, f"directory {path} does not exist")
        elif key != "ca_path" and not path.is_file():
            self.warn(sec, key, f"file {path} does not exist: create it (Debian's tls.cfg "
                      "names a certificate its package does not install) or change the path")

    # -- what both kinds of profile share --

    def _versions(self, table: _Draft) -> str:
        """min/max_version from method; returns the method in effect."""
        sec = table.section
        method = sec.get("method")
        if method is None:
            method = _DEFAULT_METHOD
            if sec.line:
                self.warn(sec, "method", "not set: Kamailio's default is TLSv1+ (TLS 1.0 and "
                          "later); tlsbridge accepts TLS 1.2 and 1.3 only")
        elif method in _OLD_METHODS:
            self.warn(sec, "method", f"{method} ({_OLD_METHODS[method]}) cannot be carried over: "
                      "tlsbridge speaks TLS 1.2 and 1.3 only (RFC 8996 retired TLS 1.0 and "
                      "1.1); converted to TLSv1.2-TLSv1.3, peers without TLS 1.2 cannot "
                      "connect")
        low, high = _RANGES.get(method, ("TLSv1.2", "TLSv1.3"))
        said = self._said(sec, "method") or f"Kamailio's default {_DEFAULT_METHOD}"
        table.set("min_version", low, said)
        table.set("max_version", high)
        return method

    def _ciphers(self, table: _Draft, method: str) -> None:
        sec = table.section
        if sec.get("cipher_list") is None:
            return
        if method in ("TLSv1.3", "TLSv1.3+"):
            # Kamailio hands cipher_list to SSL_CTX_set_ciphersuites() for these methods only.
            table.set("tls13_ciphersuites", sec.get("cipher_list"),
                      f"{self._said(sec, 'cipher_list')} (TLS 1.3 suites with method {method})")
            self.warn(sec, "cipher_list", f"with method {method} it lists TLS 1.3 suites "
                      "(tls13_ciphersuites): tlsbridge's openssl engine cannot restrict them "
                      "(Python's ssl has no API for it) and refuses the profile; choose another "
                      "engine, or drop tls13_ciphersuites to keep OpenSSL's TLS 1.3 suites")
        else:
            table.set("ciphers", sec.get("cipher_list"),
                      f"{self._said(sec, 'cipher_list')} (TLS 1.2; TLS 1.3 keeps OpenSSL's "
                      "suites, as in Kamailio)")

    def _verify_mode(self, sec: Section) -> str:
        """verify_client as Kamailio's set_verification() combines the three keys."""
        vc = sec.get("verify_client")
        if sec.get("require_certificate") or vc == "on":
            mode = "optional_no_ca" if vc == "optional_no_ca" else "on"
        elif sec.get("verify_certificate") or vc in ("optional", "optional_no_ca"):
            mode = vc if vc == "optional_no_ca" else "optional"
        else:
            mode = "off"
        if vc is not None and vc != mode:
            others = self._said(sec, "verify_certificate", "require_certificate")
            self.warn(sec, "verify_client", f"{vc} together with {others}: Kamailio applies "
                      f"both, which is {mode!r}")
        return mode

    def _identity(self, table: _Draft, *, server: bool) -> None:
        sec = table.section
        cert, key = sec.get("certificate"), sec.get("private_key")
        if server:
            for k in ("certificate", "private_key"):
                if sec.get(k) is None:
                    if sec.line:
                        self.warn(sec, k, f"not set: Kamailio uses its built-in {_DEFAULT_CERT!r}"
                                  " (beside kamailio.cfg), not the value of [server:default]")
                    table.set(k, _DEFAULT_CERT, "Kamailio's default")
                    self.relative_paths = True
                else:
                    self._path(table, k)
        elif cert is not None and key is None:
            self.warn(sec, "private_key", "not set: Kamailio would load no key for "
                      "the client certificate; tlsbridge reads the key from the certificate "
                      "file (a PEM holding both)")
            self._path(table, "certificate")
            table.set("private_key", cert, "assumed in the certificate file")
        elif cert is None and key is not None:
            self.warn(sec, "private_key", "without a certificate: Kamailio sent no client "
                      "certificate; dropped")
        else:
            self._path(table, "certificate")
            self._path(table, "private_key")
        if sec.get("private_key_password") is not None and (server or cert is not None):
            table.set("private_key_password", sec.get("private_key_password"),
                      "or keep it in a file: private_key_password_file")
        for k in ("certificate2", "private_key2", "private_key_password2"):
            if sec.get(k) is not None:
                self.warn(sec, k, "a second (dual RSA/ECDSA) certificate is not supported: "
                          "tlsbridge serves one certificate per profile; dropped")
        self._path(table, "ca_list")
        self._path(table, "ca_path")
        self._path(table, "crl")

    def _depth(self, table: _Draft) -> None:
        sec = table.section
        depth = sec.get("verify_depth")
        if depth is None:
            return  # 9 in both
        if depth < 1:
            self.warn(sec, "verify_depth", f"{depth}: tlsbridge needs at least 1; set to 1")
            depth = 1
        table.set("verify_depth", depth)

    # -- server profiles --

    def server_table(self, sec: Section, name: str) -> Table:
        """The [profile.NAME] of a server section."""
        table = _Draft("profile", name, sec)
        self._identity(table, server=True)
        mode = self._verify_mode(sec)
        said = self._said(sec, *_VERIFY_KEYS)
        table.set("verify_client", mode, said or "Kamailio's default")
        if mode in ("on", "optional") and sec.get("ca_list") is None \
                and sec.get("ca_path") is None:
            self.warn(sec, "ca_list", f"not set although client certificates are verified "
                      f"({mode!r}): Kamailio had no CA and failed every client certificate; "
                      "tlsbridge refuses such a profile: add ca_list (or ca_path)")
        if mode == "optional_no_ca":
            if sec.get("require_certificate"):
                self.warn(sec, "require_certificate", "with verify_client = optional_no_ca "
                          "Kamailio refused clients without a certificate; tlsbridge's "
                          "optional_no_ca accepts them")
            # Python's ssl module cannot accept an unverifiable certificate.
            table.set("engine", "pyopenssl", "optional_no_ca needs engine pyopenssl or gnutls")
        self._depth(table)
        self._ciphers(table, self._versions(table))
        self._server_names(table)
        if sec.get("server_id") is not None:
            self.warn(sec, "server_id", "has no effect on a server profile in Kamailio (it "
                      "selects client profiles); dropped")
        return table.freeze()

    def _server_names(self, table: _Draft) -> None:
        sec = table.section
        name, mode = sec.server_name, sec.get("server_name_mode")
        if mode is not None and mode not in (0, 1, 2):
            self.warn(sec, "server_name_mode", f"{mode}: Kamailio treats it as 0 (the name only)")
        if name is None:
            if mode is not None:
                self.warn(sec, "server_name_mode", "without server_name: no effect; dropped")
            return
        if sec.kind == "default":
            self.warn(sec, "server_name", "Kamailio never matches the default profile by SNI "
                      "(it is what serves names no other profile has); dropped")
            return
        if "*" in name:
            self.warn(sec, "server_name", f"{name!r}: Kamailio compares server_name literally, "
                      "tlsbridge reads '*.' as a wildcard")
        name = name.lower()
        if mode == SUBDOMAINS:
            names = [f"*.{name}"]
        elif mode == DOMAIN_AND_SUBDOMAINS:
            names = [name, f"*.{name}"]
        else:
            names = [name]
        if mode in (SUBDOMAINS, DOMAIN_AND_SUBDOMAINS):
            self.warn(sec, "server_name_mode", f"{mode} matches every subdomain of {name} in "
                      f"Kamailio, at any depth; tlsbridge's '*.{name}' matches one label only "
                      f"(a.{name}, not a.b.{name}): list deeper names in server_names")
        table.set("server_names", names, self._said(sec, "server_name", "server_name_mode"))

    # -- client profiles --

    def client_table(self, sec: Section, name: str, destination: str | None) -> Table:
        """The [client.NAME] of a client section; `destination` the address it is used for
        when a connect names no profile."""
        table = _Draft("client", name, sec)
        self._identity(table, server=False)
        mode = self._verify_mode(sec)
        verify = mode in ("on", "optional")  # optional_no_ca: every certificate passes
        said = self._said(sec, *_VERIFY_KEYS)
        table.set("verify_server", verify, said or "Kamailio's default: no verification")
        if verify and sec.get("ca_list") is None and sec.get("ca_path") is None:
            self.warn(sec, "ca_list", "not set: Kamailio had no CA to verify servers with (every "
                      "verification failed); tlsbridge uses the system's trust store")
        # The server_name of an address or `any` profile is the server's SIP domain: the name
        # tlsbridge checks (Kamailio checked no name at all).
        name = sec.server_name
        exact = sec.get("server_name_mode") not in (SUBDOMAINS, DOMAIN_AND_SUBDOMAINS)
        if verify and name and exact and sec.kind != "default":
            table.set("verify_name", name, self._said(sec, "server_name"))
            checked = repr(name)
        else:
            checked = "the SNI or destination host"
        if verify:
            key = next(k for k in _VERIFY_KEYS if k in sec.settings)
            self.warn(sec, key, "Kamailio checked only the server's "
                      f"certificate chain; tlsbridge also checks that it names {checked} "
                      "(RFC 5922)")
        self._depth(table)
        self._ciphers(table, self._versions(table))
        if destination:
            table.set("destinations", [destination], f"{sec.title}: used when a connect names "
                      "no profile")
        self._client_selection(table, destination)
        return table.freeze()

    def _client_selection(self, table: _Draft, destination: str | None) -> None:
        sec = table.section
        server_id = sec.get("server_id")
        if sec.kind == "default":
            for key in ("server_name", "server_name_mode", "server_id"):
                if sec.get(key) is not None:
                    self.warn(sec, key, "is never matched on the default client profile in "
                              "Kamailio; dropped")
            return
        if server_id is not None:
            self.warn(sec, "server_id", f"Kamailio chose this profile when $xavp(tls=>server_id)"
                      f" was {server_id!r}; tlsbridge chooses client profiles by name: connect "
                      f"(or a [trunk.*] client) with profile {table.name!r}")
        if sec.kind == "any":
            self.warn(sec, "server_name", "Kamailio chose this profile by the outbound SNI "
                      "($xavp(tls=>server_name)); tlsbridge chooses client profiles by "
                      f"destination or by name: connect with profile {table.name!r}")
        elif destination is None:
            self.warn(sec, "server_name", "Kamailio chose this profile for its address when the "
                      "outbound SNI matched server_name; another profile has the address in "
                      f"tlsbridge: connect with profile {table.name!r}")
        elif sec.server_name is not None:
            self.warn(sec, "server_name", f"Kamailio used this profile for {destination} when the"
                      " outbound SNI was unset or matched server_name; tlsbridge uses it for "
                      f"every connection to {destination} that names no profile")
        mode = sec.get("server_name_mode")
        if mode not in (None, 0) and sec.kind != "default":
            self.warn(sec, "server_name_mode", f"{mode}: selecting a client profile by SNI "
                      "subdomains is not supported; dropped")

