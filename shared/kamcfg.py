"""Kamailio's cfg as Kamailio evaluates it, read into the few facts the bridge depends on.

`kamailio -f FILE --cfg-print` resolves `#!ifdef`, `include_file` and `import_file` (Kamailio
5.6) but keeps comments and leaves `#!define`d names unexpanded; `parse_cfg` does the rest:
it strips comments, expands defines outside strings, and splits the text into top-level
statements and route blocks. `evaluate_cfg` runs Kamailio; everything else is plain text in,
frozen data out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

KAMAILIO_PATHS = ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio")


class CfgError(ValueError):
    """The cfg could not be evaluated; the message names the file."""


@dataclass(frozen=True, slots=True)
class Listen:
    """One `listen=` socket: `proto` is "" when the line names none (every protocol)."""

    proto: str
    host: str
    port: int | None
    advertise: str | None = None

    def serves(self, proto: str) -> bool:
        return self.proto in ("", proto)


@dataclass(frozen=True, slots=True)
class KamailioCfg:
    path: str
    core: tuple[tuple[str, str], ...]  # (name, value) of global parameters, in order
    listens: tuple[Listen, ...]
    aliases: tuple[str, ...]
    modules: tuple[str, ...]  # loaded modules by name: "tls", "app_python3"
    modparams: tuple[tuple[str, str, str], ...]  # (module or "a|b", param, value unquoted)
    blocks: tuple[tuple[str, str], ...]  # ("request_route" | "route[RELAY]" | ..., body)
    cfgengine: str | None

    def setting(self, name: str) -> str | None:
        """The last value given to a global parameter (as Kamailio keeps it)."""
        found = None
        for key, value in self.core:
            if key == name:
                found = value
        return found

    def flag(self, name: str) -> bool | None:
        value = self.setting(name)
        if value is None:
            return None
        return value.strip('"').lower() in ("yes", "on", "true", "1", "enable")

    def modparam(self, module: str, param: str) -> str | None:
        found = None
        for mods, key, value in self.modparams:
            if key == param and module in mods.split("|"):
                found = value
        return found

    def routes(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def calls(self, function: str, arg: str | None = None) -> bool:
        """Does any route call `function(...)`, with `arg` as its first argument if given?"""
        pattern = rf"\b{re.escape(function)}\s*\("
        if arg is not None:
            pattern += rf"\s*\"{re.escape(arg)}\""
        return any(re.search(pattern, body) for _, body in self.blocks)


def find_kamailio() -> str | None:
    """Debian installs it in /usr/sbin, which a non-root PATH lacks."""
    found = shutil.which("kamailio")
    if found:
        return found
    return next((p for p in KAMAILIO_PATHS if Path(p).exists()), None)


def evaluate_cfg(path: str | Path, defines: Sequence[str] = (),
                 kamailio: str | None = None) -> str:
    """The cfg text as Kamailio evaluates it (`-A` defines as on its command line)."""
    binary = kamailio or find_kamailio()
    if binary is None:
        raise CfgError(f"{path}: kamailio is not installed here: cannot evaluate the cfg")
    argv = [binary, "-f", str(path), "--cfg-print"]
    for define in defines:
        argv += ["-A", define]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CfgError(f"{path}: cannot run {binary} --cfg-print: {exc}") from None
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        raise CfgError(f"{path}: Kamailio refuses the cfg: {' '.join(lines[-3:])}")
    return out.stdout


def kamailio_argv_cfg(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The cfg file and `-A` defines of a Kamailio command line (its /proc/PID/cmdline)."""
    path, defines = "/etc/kamailio/kamailio.cfg", []
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        for opt in ("-f", "-A"):
            if arg == opt and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            elif arg.startswith(opt) and len(arg) > 2:
                value = arg[2:]
            else:
                continue
            if opt == "-f":
                path = value
            else:
                defines.append(value)
        i += 1
    return path, defines


# -- text ------------------------------------------------------------------------------------

def _strip_comments(text: str) -> str:
    """Drop `#` (not `#!`), `//` and `/* */` comments; strings are kept whole."""
    out: list[str] = []
    i, n = 0, len(text)
    quote = ""
    line_start = True
    while i < n:
        c = text[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == quote:
                quote = ""
            i += 1
            continue
        if c in "\"'":
            quote = c
        elif (c == "#" and not (line_start and text.startswith("#!", i))) or \
                text.startswith("//", i):
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        out.append(c)
        if c == "\n":
            line_start = True
        elif not c.isspace():
            line_start = False
        i += 1
    return "".join(out)


_DEFINE = re.compile(r"^[ \t]*#!(define|trydef|redefine|undef)[ \t]+(\w+)(?:[ \t]+(.*?))?[ \t]*$",
                     re.M)
_WORD_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\b[A-Za-z_]\w*\b')


def _expand_defines(text: str, given: Iterable[str]) -> str:
    defines: dict[str, str] = {}
    for item in given:
        name, _, value = item.partition("=")
        defines[name.strip()] = value
    for kind, name, value in _DEFINE.findall(text):
        if kind == "undef":
            defines.pop(name, None)
        elif kind != "trydef" or name not in defines:
            defines[name] = value or ""
    body = _DEFINE.sub("", text)
    body = re.sub(r"^[ \t]*#!.*$", "", body, flags=re.M)  # other directives: nothing to check
    for _ in range(8):  # defines may name defines
        expanded = _WORD_OR_STRING.sub(
            lambda m: defines.get(m.group(0), m.group(0)) if m.group(0)[0] not in "\"'"
            else m.group(0), body)
        if expanded == body:
            break
        body = expanded
    return body


_BLOCK_HEAD = re.compile(
    r"\b(request_route|reply_route|onsend_route|route|branch_route|failure_route|"
    r"onreply_route|event_route)\s*(\[[^\]]*\])?\s*\{")


def _split_blocks(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Top-level text, and the route blocks as (kind[name], body)."""
    top: list[str] = []
    blocks: list[tuple[str, str]] = []
    pos = 0
    while True:
        m = _BLOCK_HEAD.search(text, pos)
        if m is None:
            top.append(text[pos:])
            break
        top.append(text[pos:m.start()])
        depth, i, quote = 1, m.end(), ""
        while i < len(text) and depth:
            c = text[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == quote:
                    quote = ""
            elif c in "\"'":
                quote = c
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        name = m.group(1) + (m.group(2) or "").replace(" ", "")
        if name == "route":
            name = "request_route"
        blocks.append((name, text[m.end():i - 1]))
        pos = i
    return "".join(top), blocks


def _unquote(value: str) -> str:
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"', value)
    return "".join(parts) if parts else value.strip()


def _listen(value: str) -> Listen:
    value = value.replace('"', "").strip()
    main, _, advertise = value.partition(" advertise ")
    main = main.split()[0] if main.split() else main
    proto = ""
    m = re.match(r"(udp|tcp|tls|sctp|ws|wss|any):(.*)$", main, re.I)
    if m:
        proto, main = m.group(1).lower(), m.group(2)
    if main.startswith("["):
        host, _, rest = main[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = main.partition(":")
    return Listen(proto if proto != "any" else "", host, int(port) if port.isdigit() else None,
                  advertise.strip().strip('"') or None)


_STATEMENT = re.compile(r"^[ \t]*([A-Za-z_][\w.]*)[ \t]*=[ \t]*(.+?)[ \t]*;?[ \t]*$", re.M)
_MODPARAM = re.compile(
    r'modparam\s*\(\s*"([^"]*)"\s*,\s*"([^"]*)"\s*,\s*((?:"(?:[^"\\]|\\.)*"\s*)+|[^)]*)\)')


def parse_cfg(text: str, path: str = "kamailio.cfg", defines: Iterable[str] = ()) -> KamailioCfg:
    """Parse evaluated cfg text (see `evaluate_cfg`)."""
    body = _expand_defines(_strip_comments(text), defines)
    top, blocks = _split_blocks(body)
    core: list[tuple[str, str]] = []
    listens: list[Listen] = []
    aliases: list[str] = []
    for name, value in _STATEMENT.findall(top):
        if name == "listen":
            listens.append(_listen(value))
        elif name == "alias":
            aliases.append(value.strip().strip('"'))
        else:
            core.append((name, value.strip()))
    modules = tuple(Path(m).name.removesuffix(".so")
                    for m in re.findall(r'loadmodule\s+"([^"]+)"', top))
    modparams = tuple((mod, key, _unquote(value))
                      for mod, key, value in _MODPARAM.findall(top))
    engine = re.search(r'cfgengine\s+"([^"]+)"', top)
    return KamailioCfg(
        path=path, core=tuple(core), listens=tuple(listens), aliases=tuple(aliases),
        modules=modules, modparams=modparams, blocks=tuple(blocks),
        cfgengine=engine.group(1) if engine and engine.group(1) != "native" else None,
    )


def load_cfg(path: str | Path, defines: Sequence[str] = (),
             kamailio: str | None = None) -> KamailioCfg:
    """Evaluate the cfg with Kamailio and parse it."""
    return parse_cfg(evaluate_cfg(path, defines, kamailio), str(path), defines)


def udp_address(cfg: KamailioCfg) -> str | None:
    """Where UDP peers reach Kamailio when it has one UDP socket with a concrete address."""
    found = {li.advertise or (f"{li.host}:{li.port or 5060}" if li.host.strip("[]") not in
                              ("0.0.0.0", "::", "*") else None)
             for li in cfg.listens if li.serves("udp")}
    return found.pop() if len(found) == 1 and None not in found else None
