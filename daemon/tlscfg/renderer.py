"""A `Document` as TOML text: the tables in a fixed order, each under a comment saying where it
comes from and its `# warning:` lines, and each value's origin beside it or above it.

Not a TOML library's job: tomlkit (the one that keeps comments) writes a blank line between a
comment and the table header after it and one space before an inline `#`, and has no commented
out table; the layout here is the point of the output. The values are few and simple (strings,
integers, booleans, lists of strings), so their TOML spelling is a few lines below.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from tlsbridge.daemon.tlscfg.document import Document, Table

__all__ = ["render"]

_WIDTH = 100  # ruff's line length, for readers who keep the file beside the code


def _toml_str(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
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
    """`text` as comment lines wrapped to the width, continuations indented."""
    return textwrap.wrap(_visible(text), _WIDTH - 2, initial_indent=prefix,
                         subsequent_indent=prefix + "  ", break_on_hyphens=False,
                         break_long_words=False)


def render(doc: Document) -> str:
    """The TOML text of `doc`, ending in one newline."""
    src = _visible(doc.source)
    out = [f"# tlsbridge configuration converted from Kamailio's {src}",
           "# (tlsbridge import-tls-cfg). Read the warnings below and in the tables.", "#"]
    if doc.relative_paths:
        out += _comment(f"Relative paths are kept as written in {src}: Kamailio read them "
                        "relative to the directory of kamailio.cfg (normally the tls.cfg's "
                        "directory), tlsbridge reads them relative to this file's directory. "
                        f"Save this file in the directory of {src}, or make the paths "
                        "absolute.")
        out.append("#")
    out += _comment("[zmq] and [outbound] keep their defaults; see the README.")
    for note in doc.notes:
        out += _comment(f"warning: {note}")
    out += ["", "[daemon]", f"run_dir = {_toml_str(doc.run_dir)}"]
    out += ["", "[kamailio]"]
    out += _comment("Kamailio drops tls.so and takes the decrypted connections here: "
                    f"listen=tcp:{doc.hairpin} and tcp_accept_haproxy=yes in kamailio.cfg.")
    out += [f"hairpin = {_toml_str(doc.hairpin)}",
            "proxy_protocol = 1  # 2 only with Kamailio >= 5.8",
            f"sip_address = {_toml_str(doc.sip_address)}  # Record-Route towards non-TLS peers",
            ""]
    for lst in doc.listeners:
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
    for table in (*doc.profiles, *doc.clients):
        out += _table(table)
    return "\n".join(out).rstrip("\n") + "\n"


def _table(table: Table) -> list[str]:
    sec = table.section
    origin = f"{sec.title} ({_visible(sec.source)} line {sec.line})" if sec.line \
        else f"{sec.title} (not in {_visible(sec.source)}: Kamailio's built-in defaults)"
    out = _comment(origin)
    for note in table.notes:
        out += _comment(f"warning: {note}")
    out.append(f"[{table.kind}.{_toml_key(table.name)}]")
    for entry in table.entries:
        line = f"{entry.key} = {_toml_value(entry.value)}"
        # The origin beside the value when the line stays within the width, else above it.
        if entry.comment and len(line) + len(entry.comment) + 4 <= _WIDTH:
            line += "  # " + _visible(entry.comment)
        elif entry.comment:
            out += _comment(entry.comment)
        out.append(line)
    return [*out, ""]
