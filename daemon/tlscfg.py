"""Import Kamailio's tls.cfg: read the tls module's profile file, write tlsbridge's TOML.

`parse_tls_cfg` reads the syntax as Kamailio's tls module does (the lexer of core/cfg_parser.c and
the sections and keys of modules/tls/tls_config.c, Kamailio 5.6 to 6.x). `convert` maps the
profiles onto [[listener]], [profile.*] and [client.*] tables, following how Kamailio chooses a
profile (tls_domain.c), and returns as warnings everything tlsbridge cannot do the same way.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

from tlsbridge.daemon.config import PLACEHOLDER
from tlsbridge.daemon.engines.registry import FIXED_BEFORE_SNI
from tlsbridge.shared.addr import format_addr, parse_addr

__all__ = [
    "ConversionResult",
    "Section",
    "Setting",
    "TlsCfg",
    "TlsCfgError",
    "convert",
    "convert_tls_cfg",
    "main_import",
    "parse_tls_cfg",
    "read_tls_cfg",
]

Role = Literal["server", "client"]
Kind = Literal["default", "any", "address"]


class TlsCfgError(ValueError):
    """A tls.cfg that Kamailio would refuse; the message starts with `file:line:column:`."""

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        where = f"{source}:{line}:{column}" if column else f"{source}:{line}"
        super().__init__(f"{where}: {message}")
        self.source, self.line, self.column, self.message = source, line, column, message


@dataclass(frozen=True, slots=True)
class Setting:
    """One `key = value` line: `key` is the canonical name, `spelling` what the file wrote."""

    key: str
    spelling: str
    value: Any  # bool, int, str; methods and verify_client in their canonical spelling
    text: str  # the value as written (after unquoting)
    line: int


@dataclass(eq=False, slots=True)
class Section:
    """A TLS profile: `[server:default]`, `[client:any]`, `[server:192.0.2.1:5061]`..."""

    role: Role
    kind: Kind
    line: int  # 0: not in the file (Kamailio's built-in default profile)
    source: str = "tls.cfg"
    host: str | None = None  # normalised IP address, for kind "address"
    port: int | None = None  # 0 matches every port of `host`
    settings: dict[str, Setting] = field(default_factory=dict)
    replaced: list[Setting] = field(default_factory=list)  # set again further down

    @property
    def title(self) -> str:
        if self.kind != "address":
            return f"[{self.role}:{self.kind}]"
        return f"[{self.role}:{format_addr(self.host or '', self.port or 0)}]"

    def get(self, key: str) -> Any:
        setting = self.settings.get(key)
        return None if setting is None else setting.value

    @property
    def server_name(self) -> str | None:
        # An empty server_name is no server_name: Kamailio tests its length.
        return self.get("server_name") or None

    def where(self, key: str | None = None) -> str:
        """`tls.cfg:12: [server:any] server_name` for messages."""
        setting = self.settings.get(key) if key else None
        line = setting.line if setting else self.line
        prefix = f"{self.source}:{line}: " if line else f"{self.source}: "
        return prefix + self.title + (f" {key}" if key else "")


@dataclass(slots=True)
class TlsCfg:
    """The sections of a tls.cfg in file order, and what reading it had to say."""

    source: str
    sections: list[Section]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConversionResult:
    """What `convert` returns."""

    toml: str  # a complete tlsbridge configuration, with comments
    warnings: list[str]  # what could not be carried over; also written as comments in `toml`


# --- the lexer (core/cfg_parser.c) -----------------------------------------------------------

_ALPHA = frozenset(string.ascii_letters + string.digits + "_")
_DELIM = frozenset("=:;.,?[]/@!$%&*()-+|'")
_SPACE = frozenset(" \t\r")
_MAX_TOKEN = 512  # Kamailio's MAX_TOKEN_LEN: a longer word or string is an error there


class _Token(NamedTuple):
    kind: str  # "word", "string", "eol", or the delimiter character itself
    text: str
    line: int
    column: int


class _Lexer:
    """Kamailio's tokenizer. Keys and section headers are read as plain words (letters, digits,
    `_`) with every delimiter its own token; values in "extended" mode, where delimiters are part
    of the word, so that paths and cipher lists need no quotes. `#` starts a comment anywhere a
    token can start or end, a backslash escapes, a quoted string may hold anything."""

    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source
        self.pos, self.line, self.column = 0, 1, 1

    def error(self, message: str, at: _Token | None = None) -> TlsCfgError:
        line, column = (at.line, at.column) if at else (self.line, self.column)
        return TlsCfgError(self.source, line, column, message)

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _take(self) -> str:
        c = self.text[self.pos]
        self.pos += 1
        if c == "\n":
            self.line, self.column = self.line + 1, 1
        else:
            self.column += 1
        return c

    def _invalid(self, c: str) -> TlsCfgError:
        return self.error(f"invalid character {c!r}")

    def _escaped(self, *, quoted: bool = False) -> str | None:
        """Read the character after a backslash: what it stands for, None for an end of line
        (a line continuation). Inside quotes `#` and space need no escape and take none."""
        where = _Token("escape", "", self.line, self.column)
        c = self._take()
        if c in '"\\' or (c in "# " and not quoted):
            return c
        if c in "rnt":
            return {"r": "\r", "n": "\n", "t": "\t"}[c]
        if c == "\n":
            return None
        raise self.error(f"unsupported escape character {c!r}", where)

    def token(self, *, extended: bool = False) -> _Token | None:
        """The next token, None at the end of the text."""
        buf: list[str] = []
        state, line, column = "start", self.line, self.column

        def push(c: str) -> None:
            if len(buf) >= _MAX_TOKEN:
                raise self.error(f"token longer than {_MAX_TOKEN} characters (Kamailio's limit)",
                                 _Token("word", "", line, column))
            buf.append(c)

        while (c := self._peek()) != "":
            if state == "start":
                line, column = self.line, self.column
                if c in _SPACE:
                    self._take()
                elif c == "#":
                    self._take()
                    state = "comment"
                elif c == '"':
                    self._take()
                    state = "quoted"
                elif c == "\n":
                    self._take()
                    return _Token("eol", c, line, column)
                elif c in _ALPHA or (extended and (c in _DELIM or c == "\\")):
                    # Kamailio keeps a backslash that starts a value as it is.
                    push(self._take())
                    state = "word"
                elif c in _DELIM:
                    self._take()
                    return _Token(c, c, line, column)
                elif c == "\\":
                    self._take()
                    state = "escape"
                else:
                    raise self._invalid(c)
            elif state == "word":
                if c in _ALPHA or (extended and (c in _DELIM or c == '"')):
                    push(self._take())
                elif c == "\\":
                    self._take()
                    state = "word_escape"
                elif c in _SPACE or c in "#\n" or c in _DELIM or c == '"':
                    break  # the character starts the next token
                else:
                    raise self._invalid(c)
            elif state == "word_escape":
                if (e := self._escaped()) is not None:
                    push(e)
                state = "word"
            elif state == "quoted":
                c = self._take()
                if c == '"':
                    return _Token("string", "".join(buf), line, column)
                if c == "\\":
                    state = "quoted_escape"
                else:
                    push(c)
            elif state == "quoted_escape":
                if (e := self._escaped(quoted=True)) is not None:
                    push(e)
                state = "quoted"
            elif state == "comment":
                if c == "\n":
                    state = "start"  # the end of line is still a token
                else:
                    self._take()
                    if c == "\\":
                        state = "comment_escape"
            elif state == "comment_escape":
                self._take()  # an escaped end of line continues the comment
                state = "comment"
            else:  # "escape", outside a word: only useful as a line continuation
                e = self._escaped()
                if e is not None:
                    # Kamailio returns it as a lone token of that character: an escaped "n"
                    # is an end of line, anything else a syntax error.
                    return _Token("eol" if e == "\n" else e, e, line, column)
                state = "start"
        if state == "word":
            return _Token("word", "".join(buf), line, column)
        if state in ("quoted", "quoted_escape"):
            raise self.error("end of file inside a quoted string (missing closing quote)")
        if state in ("escape", "word_escape"):
            raise self.error("end of file after a backslash")
        return None


# --- keys and sections (modules/tls/tls_config.c) --------------------------------------------

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


class _Parser:
    """sr_cfg_parse() with tls_config.c's section parser and option table."""

    def __init__(self, text: str, source: str) -> None:
        self.lex = _Lexer(text, source)
        self.source = source
        self.sections: list[Section] = []

    def parse(self) -> TlsCfg:
        while (tok := self.lex.token()) is not None:
            if tok.kind == "word":
                self._option(tok)
            elif tok.kind == "[":
                self._section(tok)
            elif tok.kind != "eol":
                raise self.lex.error(f"syntax error at {tok.text!r}", tok)
        return TlsCfg(self.source, self.sections)

    def _next(self, what: str, *, extended: bool = False) -> _Token:
        tok = self.lex.token(extended=extended)
        if tok is None:
            raise self.lex.error(f"end of file: {what} expected")
        return tok

    def _expect(self, kind: str, what: str) -> _Token:
        tok = self._next(what)
        if tok.kind != kind:
            raise self.lex.error(f"{what} expected, got {tok.text!r}", tok)
        return tok

    def _end_of_line(self) -> None:
        tok = self.lex.token()
        if tok is not None and tok.kind != "eol":
            raise self.lex.error(f"end of line expected, got {tok.text!r}", tok)

    def _option(self, tok: _Token) -> None:
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

    def _value(self, kind: str, key: str, tok: _Token) -> Any:
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

    def _section(self, open_tok: _Token) -> None:
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
        self.sections.append(Section(role, kind, open_tok.line, self.source, host, port))

    def _ipv4(self, first: _Token) -> str:
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

    def _ipv6(self, open_tok: _Token) -> str:
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
    cfg = TlsCfg(str(path), [s for part in parts for s in part.sections])
    _check(cfg)
    if len(files) > 1:
        cfg.warnings.append(f"{path}: Kamailio reads the files of a configuration directory in "
                            "directory order, which is not defined; they were converted in name "
                            "order, which decides between profiles whose server_name overlap")
    return cfg


# --- conversion --------------------------------------------------------------------------------

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
_SUBDOMAINS, _DOMAIN_AND_SUBDOMAINS = 2, 1  # server_name_mode; anything else: the name only
_HSM_PREFIXES = ("/engine:", "/uri:")  # private keys in an HSM (tls_openssl.h)
_VERIFY_KEYS = ("verify_certificate", "require_certificate", "verify_client")


def _toml_str(value: str) -> str:
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_str(str(value))


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_str(name)


def _visible(text: str) -> str:
    """A value shown inside a TOML comment: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _comment(text: str, prefix: str = "# ") -> list[str]:
    return textwrap.wrap(_visible(text), 98, initial_indent=prefix,
                         subsequent_indent=prefix + "  ", break_on_hyphens=False,
                         break_long_words=False)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_") or "profile"


@dataclass(slots=True)
class _Table:
    """A [profile.*] or [client.*] table on its way to TOML."""

    name: str
    section: Section
    items: list[tuple[str, Any, str]] = field(default_factory=list)  # key, value, comment
    verify: str = "off"
    crl: str | None = None
    engine: str | None = None

    def set(self, key: str, value: Any, comment: str = "") -> None:
        self.items.append((key, value, comment))


@dataclass(slots=True)
class _Listener:
    address: str
    profile: str
    sni: list[str]
    section: Section  # the profile that made it: warnings name it
    origin: str  # a comment line: where it comes from
    commented: bool = False  # written as a template the operator completes
    notes: list[str] = field(default_factory=list)
    engine: str | None = None  # when the profiles chosen by SNI need one
    engine_why: str = ""


def placeholder(what: str) -> str:
    """A value the operator must set: `tlsbridge check` refuses it until then."""
    return f"{PLACEHOLDER} {what}>"


@dataclass(frozen=True, slots=True)
class Site:
    """What a tls.cfg does not say: where the daemon listens and meets Kamailio."""

    tls_port: int = 5061
    hairpin: str = "127.0.0.1:5062"
    listen_ip: str | None = None  # the address of the [server:default] listener
    run_dir: str | None = None
    sip_address: str | None = None


class _Converter:
    def __init__(self, cfg: TlsCfg, site: Site) -> None:
        self.cfg, self.site = cfg, site
        self.tls_port, self.hairpin = site.tls_port, site.hairpin
        self.warnings: list[tuple[tuple[int, int], str]] = [((-1, 0), w) for w in cfg.warnings]
        self.sources = {sec.source: i for i, sec in reversed(list(enumerate(cfg.sections)))}
        self.global_notes: list[str] = list(cfg.warnings)
        self.notes: dict[Section, list[str]] = {}
        self.relative_paths = False

    # -- helpers --

    def warn(self, sec: Section, key: str | None, message: str,
             notes: list[str] | None = None) -> None:
        """Record a warning; it is also written as a comment above the section's table (or
        into `notes`)."""
        text = f"{sec.where(key)}: {message}"
        setting = sec.settings.get(key) if key else None
        order = (self.sources.get(sec.source, -1), setting.line if setting else sec.line)
        self.warnings.append((order, text))
        (self.notes.setdefault(sec, []) if notes is None else notes).append(text)

    @staticmethod
    def _said(sec: Section, *keys: str) -> str:
        """`verify_certificate = yes, require_certificate = no`: the source of a value."""
        return ", ".join(f"{sec.settings[k].spelling} = {sec.settings[k].text}"
                         for k in keys if k in sec.settings)

    def _path(self, table: _Table, key: str) -> str | None:
        sec = table.section
        value = sec.get(key)
        if value is None:
            return None
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
        return value

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

    @staticmethod
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

    @staticmethod
    def _server_name_of(sec: Section) -> str:
        if sec.server_name:
            return _slug(sec.server_name)
        return f"srv_{_slug(sec.host or '')}_{sec.port}"

    @staticmethod
    def _client_name_of(sec: Section) -> str:
        # server_id first: scripts that set $xavp(tls=>server_id) can pass it as the profile.
        server_id = sec.get("server_id")
        if server_id:
            return server_id if re.fullmatch(r"[A-Za-z0-9_.-]+", server_id) else _slug(server_id)
        if sec.kind == "any":
            return _slug(sec.server_name or "")
        return f"cli_{_slug(sec.host or '')}_{sec.port}"

    # -- what both kinds of profile share --

    def _versions(self, table: _Table) -> str:
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

    def _ciphers(self, table: _Table, method: str) -> None:
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

    def _identity(self, table: _Table, *, server: bool) -> None:
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
        table.crl = self._path(table, "crl")

    def _depth(self, table: _Table) -> None:
        sec = table.section
        depth = sec.get("verify_depth")
        if depth is None:
            return  # 9 in both
        if depth < 1:
            self.warn(sec, "verify_depth", f"{depth}: tlsbridge needs at least 1; set to 1")
            depth = 1
        table.set("verify_depth", depth)

    # -- server profiles and listeners --

    def server_table(self, sec: Section, name: str) -> _Table:
        table = _Table(name, sec)
        self._identity(table, server=True)
        mode = self._verify_mode(sec)
        table.verify = mode
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
            table.engine = "pyopenssl"
            table.set("engine", "pyopenssl", "optional_no_ca needs engine pyopenssl or gnutls")
        self._depth(table)
        self._ciphers(table, self._versions(table))
        self._server_names(table)
        if sec.get("server_id") is not None:
            self.warn(sec, "server_id", "has no effect on a server profile in Kamailio (it "
                      "selects client profiles); dropped")
        return table

    def _server_names(self, table: _Table) -> None:
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
        if mode == _SUBDOMAINS:
            names = [f"*.{name}"]
        elif mode == _DOMAIN_AND_SUBDOMAINS:
            names = [name, f"*.{name}"]
        else:
            names = [name]
        if mode in (_SUBDOMAINS, _DOMAIN_AND_SUBDOMAINS):
            self.warn(sec, "server_name_mode", f"{mode} matches every subdomain of {name} in "
                      f"Kamailio, at any depth; tlsbridge's '*.{name}' matches one label only "
                      f"(a.{name}, not a.b.{name}): list deeper names in server_names")
        table.set("server_names", names, self._said(sec, "server_name", "server_name_mode"))

    def listeners(self, default: _Table, tables: dict[Section, _Table]) -> list[_Listener]:
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
        out: list[_Listener] = []
        for address, group in groups.items():
            last = group[-1]
            origin = f"{last.title}: its own listener"
            if last.server_name is None:  # alone, unless port 0 met the same address
                out.append(_Listener(address, tables[last].name, [], last, origin))
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
            out.append(_Listener(address, tables[last].name, [tables[s].name for s in order],
                                 last, origin))
            self.warn(last, "server_name", f"Kamailio serves clients of {address} that send no "
                      "SNI with this profile (the last for the address) and those whose SNI "
                      "matches no server_name with [server:default]; tlsbridge serves both "
                      "with this profile")
        address = format_addr(self.site.listen_ip, self.tls_port) if self.site.listen_ip \
            else f"{placeholder('the IP the daemon listens on for TLS, e.g. 192.0.2.10')}:" \
                 f"{self.tls_port}"
        catch_all = _Listener(address, default.name,
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

    def _check_listener(self, lst: _Listener, by_name: dict[str, _Table]) -> None:
        if not lst.sni:
            return
        base = by_name[lst.profile]
        sni = [by_name[n] for n in lst.sni]
        odd = [t.name for t in sni if (t.verify, t.crl) != (base.verify, base.crl)]
        if odd:
            self.warn(lst.section, None, f"listener {lst.address}: profiles {', '.join(odd)} "
                      f"verify clients (verify_client, crl) unlike its default profile "
                      f"{base.name!r}: Kamailio switches this by SNI, tlsbridge's openssl "
                      "engine cannot and refuses to start; give them the same verification or "
                      "a listener of their own", lst.notes)
        other = [t.name for t in (base, *sni) if t.engine]
        if other:
            self.warn(lst.section, None, f"listener {lst.address}: profiles {', '.join(other)} "
                      "need engine pyopenssl (verify_client optional_no_ca) but choosing "
                      "profiles by SNI needs engine openssl", lst.notes)
        # Kamailio takes the first profile whose name or subdomains match; tlsbridge prefers an
        # exact name to a wildcard whatever the order.
        for i, first in enumerate(sni):
            mode = first.section.get("server_name_mode")
            if mode not in (_SUBDOMAINS, _DOMAIN_AND_SUBDOMAINS):
                continue
            parent = (first.section.server_name or "").lower()
            for later in sni[i + 1:]:
                name = (later.section.server_name or "").lower()
                if later.section.get("server_name_mode") != _SUBDOMAINS \
                        and name.endswith("." + parent):
                    self.warn(later.section, "server_name", f"on {lst.address} Kamailio serves "
                              f"{name} with {first.section.title} (line {first.section.line}), "
                              "which comes first in its order and matches subdomains; "
                              "tlsbridge prefers the exact name and serves it with this profile")

    # -- client profiles --

    def client_table(self, sec: Section, name: str, destination: str | None) -> _Table:
        table = _Table(name, sec)
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
        exact = sec.get("server_name_mode") not in (_SUBDOMAINS, _DOMAIN_AND_SUBDOMAINS)
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
        return table

    def _client_selection(self, table: _Table, destination: str | None) -> None:
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

    # -- the whole file --

    def run(self) -> ConversionResult:
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
        names = self._names(servers, self._server_name_of, {"default"})
        default = self.server_table(srv_default, "default")
        tables = {s: self.server_table(s, names[s]) for s in servers}
        listeners = self.listeners(default, tables)
        by_name = {t.name: t for t in (default, *tables.values())}
        for lst in listeners:
            self._engine_for(lst, by_name)

        clients = [s for s in secs if s.role == "client" and s.kind != "default"]
        cnames = self._names(clients, self._client_name_of, {"default"})
        # Without an outbound SNI Kamailio takes the newest profile of an address.
        owner: dict[str, Section] = {}
        for sec in clients:
            if sec.kind == "address":
                port = sec.port or self.tls_port
                if sec.port == 0:
                    self.warn(sec, None, f"port 0 matches every port of {sec.host} in Kamailio;"
                              f" tlsbridge's destinations take one: {self.tls_port}")
                owner[format_addr(sec.host or "", port)] = sec
        dest = {sec: addr for addr, sec in owner.items()}
        ctables = [self.client_table(cli_default, "default", None)]
        ctables += [self.client_table(s, cnames[s], dest.get(s)) for s in clients]
        toml = self.render(listeners, [default, *tables.values()], ctables)
        # Stable: in file order, and in the order they were found within a line.
        return ConversionResult(toml, [w for _, w in sorted(self.warnings, key=lambda w: w[0])])

    def _engine_for(self, lst: _Listener, tables: dict[str, _Table]) -> None:
        """The first engine that can switch, by SNI, everything the listener's profiles
        differ in (each engine settles some keys before it sees the name)."""
        if not lst.sni:
            return
        profiles = [tables[lst.profile], *(tables[n] for n in lst.sni)]
        values = [{k: v for k, v, _ in t.items} for t in profiles]

        def differing(keys: Iterable[str]) -> list[str]:
            return sorted(k for k in set(keys) if len({repr(v.get(k)) for v in values}) > 1)

        # optional_no_ca already asked for pyopenssl: openssl cannot do it.
        forced = any(t.engine for t in profiles)
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

    def render(self, listeners: list[_Listener], profiles: list[_Table],
               clients: list[_Table]) -> str:
        src = _visible(self.cfg.source)
        out = [f"# tlsbridge configuration converted from Kamailio's {src}",
               "# (tlsbridge import-tls-cfg). Read the warnings below and in the tables.", "#"]
        if self.relative_paths:
            out += _comment(f"Relative paths are kept as written in {src}: Kamailio read them "
                            "relative to the directory of kamailio.cfg (normally the tls.cfg's "
                            "directory), tlsbridge reads them relative to this file's directory. "
                            f"Save this file in the directory of {src}, or make the paths "
                            "absolute.")
            out.append("#")
        out += _comment("[zmq] and [outbound] keep their defaults; see the README.")
        for note in self.global_notes:
            out += _comment(f"warning: {note}")
        run_dir = self.site.run_dir or placeholder("a directory on tmpfs Kamailio can read, "
                                                   "e.g. /run/tlsbridge")
        sip = self.site.sip_address or placeholder("where UDP peers reach Kamailio, e.g. "
                                                   "192.0.2.10:5060")
        out += ["", "[daemon]", f"run_dir = {_toml_str(run_dir)}"]
        out += ["", "[kamailio]"]
        out += _comment("Kamailio drops tls.so and takes the decrypted connections here: "
                        f"listen=tcp:{self.hairpin} and tcp_accept_haproxy=yes in kamailio.cfg.")
        out += [f"hairpin = {_toml_str(self.hairpin)}",
                "proxy_protocol = 1  # 2 only with Kamailio >= 5.8",
                f"sip_address = {_toml_str(sip)}  # Record-Route towards non-TLS peers", ""]
        for lst in listeners:
            out += _comment(lst.origin)
            for note in lst.notes:
                out += _comment(f"warning: {note}")
            lines = ["[[listener]]", f"address = {_toml_str(lst.address)}",
                     f"profile = {_toml_str(lst.profile)}"]
            if lst.sni:
                lines.append(f"profiles = {_toml_value(lst.sni)}  # by SNI, in Kamailio's order")
            if lst.engine:
                lines.append(f"engine = {_toml_str(lst.engine)}  # {lst.engine_why}")
            out += ["# " + line for line in lines] if lst.commented else lines
            out.append("")
        for kind, tables in (("profile", profiles), ("client", clients)):
            for table in tables:
                out += self._render_table(kind, table)
        return "\n".join(out).rstrip("\n") + "\n"

    def _render_table(self, kind: str, table: _Table) -> list[str]:
        sec = table.section
        origin = f"{sec.title} ({_visible(sec.source)} line {sec.line})" if sec.line \
            else f"{sec.title} (not in {_visible(sec.source)}: Kamailio's built-in defaults)"
        out = _comment(origin)
        for note in self.notes.get(sec, []):
            out += _comment(f"warning: {note}")
        out.append(f"[{kind}.{_toml_key(table.name)}]")
        for key, value, comment in table.items:
            line = f"{key} = {_toml_value(value)}"
            if comment and len(line) + len(comment) + 4 <= 100:
                line += "  # " + _visible(comment)
            elif comment:
                out += _comment(comment)
            out.append(line)
        return [*out, ""]


def convert_tls_cfg(cfg: TlsCfg, site: Site = Site()) -> ConversionResult:
    """Convert parsed profiles (see `convert`)."""
    tls_port = site.tls_port
    if not isinstance(tls_port, int) or isinstance(tls_port, bool) or not 0 < tls_port < 65536:
        raise ValueError(f"tls_port must be a port number, got {tls_port!r}")
    parse_addr(site.hairpin)  # ValueError for a bad hairpin
    if site.sip_address:
        parse_addr(site.sip_address, default_port=5060)
    return _Converter(cfg, site).run()


def convert(text: str, *, source: str = "tls.cfg", **site: Any) -> ConversionResult:
    """Convert the text of a tls.cfg to a tlsbridge TOML configuration.

    `source` names the file in messages and comments; `site` (Site's fields) says what a
    tls.cfg does not:
    the port of the listener for [server:default] (and of profiles for port 0), its address,
    Kamailio's hairpin listener, run_dir and sip_address (placeholders `check` refuses when
    not given). Raises TlsCfgError (with line numbers) for a tls.cfg Kamailio would refuse, or
    one no engine can serve.
    """
    return convert_tls_cfg(parse_tls_cfg(text, source=source), Site(**site))


def main_import(path: str, out: TextIO, err: TextIO, site: Site = Site()) -> int:
    """`tlsbridge import-tls-cfg PATH`: the TOML to `out`, warnings to `err`; 0, or 2 on error."""
    try:
        result = convert_tls_cfg(read_tls_cfg(path), site)
    except OSError as exc:
        err.write(f"error: cannot read {path}: {exc.strerror or exc}\n")
        return 2
    except ValueError as exc:  # TlsCfgError included
        err.write(f"error: {exc}\n")
        return 2
    out.write(result.toml)
    for warning in result.warnings:
        err.write(f"warning: {warning}\n")
    return 0
