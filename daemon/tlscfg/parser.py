"""tls.cfg's grammar (modules/tls/tls_config.c): tokens in, the frozen model out.

sr_cfg_parse() with tls_config.c's section parser and option table: section headers, the keys
in all their aliases and the types of their values, and what Kamailio refuses once the file is
read (two default profiles, two profiles for one address...). `read_tls_cfg` also reads a
directory of files, as Kamailio's `config` parameter allows.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tlsbridge.daemon.tlscfg.errors import TlsCfgError
from tlsbridge.daemon.tlscfg.lexer import Lexer, Token
from tlsbridge.daemon.tlscfg.model import Kind, Role, Section, Setting, TlsCfg

__all__ = ["parse_tls_cfg", "read_tls_cfg"]

_BOOL, _INT, _STR, _METHOD, _VERIFY = "boolean", "integer", "string", "method", "verify_client"

# Every key Kamailio's tls.cfg accepts, in any case, with its aliases: canonical name and type.
# 5.6-5.8 know the first 20 spellings; 6.0 adds private_key_password, the 6.x development branch
# certificate2, private_key2 and private_key_password2.
_KEYS: dict[str, tuple[str, str]] = {
    "method": ("method", _METHOD),
    "tls_method": ("method", _METHOD),
    "verify_certificate": ("verify_certificate", _BOOL),
    "verify_cert": ("verify_certificate", _BOOL),
    "verify_depth": ("verify_depth", _INT),
    "require_certificate": ("require_certificate", _BOOL),
    "require_cert": ("require_certificate", _BOOL),
    "private_key": ("private_key", _STR),
    "pkey_file": ("private_key", _STR),
    "private_key_password": ("private_key_password", _STR),
    "pkey_password": ("private_key_password", _STR),
    "calist_file": ("ca_list", _STR),
    "certificate": ("certificate", _STR),
    "cert_file": ("certificate", _STR),
    "cipher_list": ("cipher_list", _STR),
    "ca_list": ("ca_list", _STR),
    "crl": ("crl", _STR),
    "server_name": ("server_name", _STR),
    "server_name_mode": ("server_name_mode", _INT),
    "server_id": ("server_id", _STR),
    "verify_client": ("verify_client", _VERIFY),
    "ca_path": ("ca_path", _STR),
    "certificate2": ("certificate2", _STR),
    "cert_file2": ("certificate2", _STR),
    "private_key2": ("private_key2", _STR),
    "pkey_file2": ("private_key2", _STR),
    "private_key_password2": ("private_key_password2", _STR),
    "pkey_password2": ("private_key_password2", _STR),
}

_METHODS = {
    m.lower(): canonical
    for canonical, spellings in {
        "SSLv2": ("SSLv2",),
        "SSLv3": ("SSLv3",),
        "SSLv23": ("SSLv23",),
        "TLSv1": ("TLSv1", "TLSv1.0"),
        "TLSv1+": ("TLSv1+", "TLSv1.0+"),
        "TLSv1.1": ("TLSv1.1",),
        "TLSv1.1+": ("TLSv1.1+",),
        "TLSv1.2": ("TLSv1.2",),
        "TLSv1.2+": ("TLSv1.2+",),
        "TLSv1.3": ("TLSv1.3",),  # 5.7 and later
        "TLSv1.3+": ("TLSv1.3+",),
    }.items()
    for m in spellings
}
_BOOLS = {
    **dict.fromkeys(("yes", "true", "enable", "enabled", "1", "on"), True),
    **dict.fromkeys(("no", "false", "disable", "disabled", "0", "off"), False),
}
_VERIFY_CLIENT = ("off", "on", "optional", "optional_no_ca")
_ROLES: dict[str, Role] = {
    "server": "server", "srv": "server", "s": "server",
    "client": "client", "cli": "client", "c": "client",
}
# Kamailio also lists "*" for default, but its lexer returns "*" as a delimiter, never as a word.
_DEFAULT_WORDS = ("default", "def")
_ANY_WORDS = ("any", "all")


@dataclass(slots=True)
class _Draft:
    """A section while its settings are being read."""

    role: Role
    kind: Kind
    line: int
    host: str | None
    port: int | None
    settings: dict[str, Setting] = field(default_factory=dict)
    replaced: list[Setting] = field(default_factory=list)

    def freeze(self, source: str) -> Section:
        return Section(self.role, self.kind, self.line, source, self.host, self.port,
                       MappingProxyType(dict(self.settings)), tuple(self.replaced))


class _Parser:
    """sr_cfg_parse() with tls_config.c's section parser and option table."""

    def __init__(self, text: str, source: str) -> None:
        self.lex = Lexer(text, source)
        self.source = source
        self.sections: list[_Draft] = []

    def parse(self) -> TlsCfg:
        while (tok := self.lex.token()) is not None:
            if tok.kind == "word":
                self._option(tok)
            elif tok.kind == "[":
                self._section(tok)
            elif tok.kind != "eol":
                raise self.lex.error(f"syntax error at {tok.text!r}", tok)
        return TlsCfg(self.source, tuple(d.freeze(self.source) for d in self.sections))

    def _next(self, what: str, *, extended: bool = False) -> Token:
        tok = self.lex.token(extended=extended)
        if tok is None:
            raise self.lex.error(f"end of file: {what} expected")
        return tok

    def _expect(self, kind: str, what: str) -> Token:
        tok = self._next(what)
        if tok.kind != kind:
            raise self.lex.error(f"{what} expected, got {tok.text!r}", tok)
        return tok

    def _end_of_line(self) -> None:
        tok = self.lex.token()
        if tok is not None and tok.kind != "eol":
            raise self.lex.error(f"end of line expected, got {tok.text!r}", tok)

    def _option(self, tok: Token) -> None:
        spec = _KEYS.get(tok.text.lower())
        if not self.sections:
            raise self.lex.error(f"option {tok.text!r} before the first [server:...] or "
                                 "[client:...] section", tok)
        if spec is None:
            raise self.lex.error(f"unsupported option {tok.text!r}", tok)
        key, kind = spec
        self._expect("=", f"'=' after {tok.text!r}")
        value_tok = self.lex.token(extended=kind != _INT)
        if value_tok is None or value_tok.kind == "eol":
            raise self.lex.error(f"value of {tok.text!r} missing", value_tok)
        if value_tok.kind not in ("word", "string"):
            raise self.lex.error(f"invalid {kind} value {value_tok.text!r} for {tok.text!r}",
                                 value_tok)
        value = self._value(kind, tok.text, value_tok)
        self._end_of_line()
        section = self.sections[-1]
        if key in section.settings:
            section.replaced.append(section.settings[key])
        section.settings[key] = Setting(key, tok.text, value, value_tok.text, tok.line)

    def _value(self, kind: str, key: str, tok: Token) -> Any:
        text = tok.text
        if kind == _STR:
            if any("\udc80" <= c <= "\udcff" for c in text):
                raise self.lex.error(f"value of {key!r} is not valid UTF-8", tok)
            return text
        if kind == _INT:
            if not re.fullmatch(r"[+-]?[0-9]+", text) or not -2**31 <= int(text) < 2**31:
                raise self.lex.error(f"invalid integer {text!r} for {key!r}", tok)
            return int(text)
        table: dict[str, Any] = {
            _BOOL: _BOOLS,
            _METHOD: _METHODS,
            _VERIFY: {v: v for v in _VERIFY_CLIENT},
        }[kind]
        if text.lower() not in table:
            choices = ", ".join(table if kind == _BOOL else dict.fromkeys(table.values()))
            raise self.lex.error(f"invalid {kind} {text!r} for {key!r}; one of: {choices}", tok)
        return table[text.lower()]

    def _section(self, open_tok: Token) -> None:
        tok = self._next("TLS profile type (server or client)")
        role = _ROLES.get(tok.text.lower()) if tok.kind == "word" else None
        if role is None:
            raise self.lex.error(f"invalid TLS profile type {tok.text!r}: server or client "
                                 "expected", tok)
        self._expect(":", "':' after the profile type")
        tok = self._next("address, 'default' or 'any'")
        host: str | None = None
        port: int | None = None
        kind: Kind = "address"
        if tok.kind == "[":
            host = self._ipv6(tok)
        elif tok.kind == "word" and tok.text.lower() in _DEFAULT_WORDS:
            kind = "default"
        elif tok.kind == "word" and tok.text.lower() in _ANY_WORDS:
            kind = "any"
        elif tok.kind == "word":
            host = self._ipv4(tok)
        else:
            raise self.lex.error(f"IP address, 'default' or 'any' expected, got {tok.text!r}", tok)
        if kind == "address":
            self._expect(":", "':' and a port after the address")
            tok = self._next("port")
            if tok.kind != "word" or not tok.text.isdigit() or int(tok.text) > 65535:
                raise self.lex.error(f"invalid port {tok.text!r}", tok)
            port = int(tok.text)
        self._expect("]", "']' closing the section header")
        self._end_of_line()
        self.sections.append(_Draft(role, kind, open_tok.line, host, port))

    def _ipv4(self, first: Token) -> str:
        octets = [first]
        for _ in range(3):
            dot = self.lex.token()
            octet = self.lex.token() if dot is not None and dot.kind == "." else None
            if octet is None or octet.kind != "word":
                octets = []
                break
            octets.append(octet)
        if len(octets) == 4 and all(o.text.isdigit() and int(o.text) <= 255 for o in octets):
            return ".".join(str(int(o.text)) for o in octets)
        raise self.lex.error(f"invalid IPv4 address starting with {first.text!r} (tls.cfg takes "
                             "IP addresses, not host names)", first)

    def _ipv6(self, open_tok: Token) -> str:
        text = ""
        while True:
            tok = self.lex.token()
            if tok is None or tok.kind not in ("word", ":", "]"):
                break
            if tok.kind == "]":
                try:
                    return ipaddress.IPv6Address(text).compressed
                except ValueError:
                    break
            text += tok.text
        raise self.lex.error(f"invalid IPv6 address [{text}...]", open_tok)


def _check(cfg: TlsCfg) -> None:
    """Refuse what Kamailio refuses after reading: two default profiles, an `any` profile
    without server_name, two profiles for one address unless both have a server_name."""
    seen: dict[tuple[str, Kind], Section] = {}
    by_address: dict[tuple[str, str | None, int | None], list[Section]] = {}
    for sec in cfg.sections:
        def fail(message: str, sec: Section = sec) -> TlsCfgError:
            return TlsCfgError(sec.source, sec.line, 0, f"{sec.title}: {message}")

        if sec.kind == "default":
            first = seen.setdefault((sec.role, "default"), sec)
            if first is not sec:
                raise fail(f"duplicate profile (first at {first.source}:{first.line})")
        elif sec.kind == "any":
            if sec.server_name is None:
                raise fail("needs a server_name: Kamailio matches [any] profiles by SNI only")
        else:
            others = by_address.setdefault((sec.role, sec.host, sec.port), [])
            for other in others:
                if sec.server_name is None or other.server_name is None:
                    raise fail(f"duplicate profile for this address (also at {other.source}:"
                               f"{other.line}); several are allowed only if each has a "
                               "server_name")
            others.append(sec)


def parse_tls_cfg(text: str, *, source: str = "tls.cfg") -> TlsCfg:
    """Read tls.cfg text; raises TlsCfgError naming `source`, line and column."""
    cfg = _Parser(text, source).parse()
    _check(cfg)
    return cfg


def _read_text(path: Path) -> str:
    # surrogateescape: stray Latin-1 bytes in comments are harmless, in values they are refused.
    return path.read_bytes().decode("utf-8", errors="surrogateescape")


def read_tls_cfg(path: str | os.PathLike[str]) -> TlsCfg:
    """Read a tls.cfg file, or a directory of them as Kamailio's `config` parameter allows.

    Raises OSError when it cannot be read, TlsCfgError when Kamailio would refuse it.
    """
    p = Path(path)
    if not p.is_dir():
        return parse_tls_cfg(_read_text(p), source=str(path))
    files = sorted(f for f in p.iterdir() if f.is_file())
    parts = [parse_tls_cfg(_read_text(f), source=str(f)) for f in files]
    warnings: tuple[str, ...] = ()
    if len(files) > 1:
        warnings = (f"{path}: Kamailio reads the files of a configuration directory in "
                    "directory order, which is not defined; they were converted in name order, "
                    "which decides between profiles whose server_name overlap",)
    cfg = TlsCfg(str(path), tuple(s for part in parts for s in part.sections), warnings)
    _check(cfg)
    return cfg
