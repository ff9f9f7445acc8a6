"""`tlsbridge migrate-cfg`: the steps of docs/migration.md applied to a kamailio.cfg.

TLS leaves the cfg (tls.so, its modparams, listen=tls:, enable_tls), the hairpin and what the
bridge needs come in, and native routes call the bridge with python_exec: before t_relay(),
before save(), instead of record_route(), in every branch route, and in an rtimer route. Lines
are commented out, never deleted, each with `# tlsbridge:` and why, and the files the cfg
includes are migrated the same way. A KEMI cfg (cfgengine) gets the cfg part; its script calls
the bridge itself (the README's KEMI module section).
"""

from __future__ import annotations

import dataclasses
import re
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlsbridge.shared.addr import format_addr, parse_addr
from tlsbridge.shared.kamcfg import KamailioCfg, load_cfg
from tlsbridge.shared.kamreview import DEFAULT_RECEIVED_AVP

MARK = "# tlsbridge:"
TIMER_BLOCK = """\
route[TLSB_TIMER] {
	python_exec("tlsb_timer");
	while (python_exec("tlsb_next_resume")) {
		t_continue("$var(tlsb_index)", "$var(tlsb_label)", "$var(tlsb_route)");
		$var(tlsb_rc) = $rc;
		python_exec("tlsb_resumed");
	}
}"""
TIMER_ROUTE = "TLSB_TIMER"
BRANCH_ROUTE = "TLSB_BRANCH"


@dataclass(frozen=True, slots=True)
class Options:
    hairpin: str = "127.0.0.1:5062"
    tls_address: str = "127.0.0.1:5061"  # the daemon's public TLS address: Kamailio's alias
    sip_address: str | None = None  # listen=udp: to add when the cfg has no UDP listener
    # app_python3 "load" for native routing: written beside the cfg when it does not exist
    script: str | None = None
    bridge_config: str = "/etc/tlsbridge/tlsbridge.toml"  # what that script reads


SCRIPT = """\
# Written by `tlsbridge migrate-cfg`: tlsbridge's helpers for native cfg routing, which
# kamailio.cfg loads into app_python3 and calls with python_exec("tlsb_...").
import os
import site

site.addsitedir({site_packages!r})  # where tlsbridge is installed

from tlsbridge.kemi import native


def mod_init():
    return native.mod_init(os.environ.get("TLSBRIDGE_CONFIG") or {config!r})
"""


@dataclass
class Migration:
    files: dict[Path, str] = field(default_factory=dict)  # path -> migrated text
    notes: list[str] = field(default_factory=list)  # what was done, and what was not


_BLOCK = re.compile(r"^\s*(request_route|route|branch_route|failure_route|onreply_route|"
                    r"reply_route|onsend_route|event_route)\s*(?:\[\s*([^\]\s]+)\s*\])?"
                    r"\s*(\{|$)")
_INCLUDE = re.compile(r'^\s*(?:import_file|include_file)\s+"([^"]+)"', re.M)
_TLS_LINE = (
    (re.compile(r'^\s*loadmodule\s+"(?:[^"]*/)?tls(?:\.so)?"'), "TLS is done by the daemon"),
    (re.compile(r'^\s*modparam\s*\(\s*"tls"'), "TLS is done by the daemon"),
    (re.compile(r"^\s*listen\s*=\s*\"?tls:", re.I), "the daemon listens for TLS"),
    (re.compile(r"^\s*enable_tls\s*=", re.I), "Kamailio sees no TLS"),
    (re.compile(r"^\s*(tcp_accept_haproxy|tcp_no_connect|tcp_defer_accept|tcp_wait_data)\s*="),
     "set in the tlsbridge block"),
)
_PLAIN_TCP = re.compile(r"^(\s*)listen\s*=\s*\"?(tcp:)?([^\s\"]+)(.*)$", re.I)


def _ifdef_depth(lines: Sequence[str]) -> list[int]:
    """The #!ifdef nesting before each line."""
    depth, out = 0, []
    for line in lines:
        out.append(depth)
        stripped = line.strip()
        if stripped.startswith(("#!ifdef", "#!ifndef", "#!ifexp")):
            depth += 1
        elif stripped.startswith("#!endif"):
            depth = max(0, depth - 1)
    return out


def _comment(line: str, why: str) -> str:
    return f"{MARK} {why}: {line.strip()}"


class _FileMigrator:
    """Line rewrites of one file; `main` adds what a cfg needs once."""

    def __init__(self, path: Path, text: str, opts: Options, native: bool, hairpin: str,
                 notes: list[str]) -> None:
        self.path, self.opts, self.native, self.hairpin = path, opts, native, hairpin
        self.lines = text.splitlines()
        self.notes = notes
        self.branch_routes: list[str] = []

    def note(self, lineno: int, message: str) -> None:
        self.notes.append(f"{self.path}:{lineno}: {message}")

    def rewrite(self) -> None:
        out: list[str] = []
        route = None
        pending_open: str | None = None  # a block head whose "{" is on a later line
        in_comment = False
        for i, line in enumerate(self.lines, 1):
            head = _BLOCK.match(line)
            if in_comment or line.lstrip().startswith(("#", "//", "/*")):
                # A /* */ comment, or a # or // line, is kept as it is.
                in_comment = ("/*" in line or in_comment) and "*/" not in line
                out.append(line)
                continue
            replaced = self._tls_or_listen(line, i)
            if replaced is not None:
                out.append(replaced)
                continue
            if head:
                route = head.group(1) + (f"[{head.group(2)}]" if head.group(2) else "")
                pending_open = route if head.group(3) != "{" else None
                out.append(line)
                if head.group(3) == "{":
                    self._opened(route, line, out, i)
                continue
            if pending_open and "{" in line:
                out.append(line)
                self._opened(pending_open, line, out, i)
                pending_open = None
                continue
            if self.native:
                line = self._routing_line(line, route, out, i)
            out.append(line)
        self.lines = out

    def _tls_or_listen(self, line: str, i: int) -> str | None:
        for pattern, why in _TLS_LINE:
            if pattern.search(line):
                self.note(i, f"commented out ({why}): {line.strip()}")
                return _comment(line, why)
        m = _PLAIN_TCP.match(line)
        if m is None:
            return None
        proto, addr = m.group(2), m.group(3)
        if re.match(r"(udp|sctp|ws|wss):", addr, re.I):
            return None
        if addr == self.hairpin:
            return None
        if proto:
            self.note(i, f"commented out (a plain TCP listener would believe PROXY headers): "
                      f"{line.strip()}")
            return _comment(line, "plain TCP would believe PROXY headers (tcp_accept_haproxy)")
        self.note(i, f"UDP only (TCP comes through the hairpin): {line.strip()}")
        return f"{m.group(1)}listen=udp:{addr}{m.group(4)}  {MARK} was listen={addr}"

    def _opened(self, route: str, line: str, out: list[str], i: int) -> None:
        indent = "\t"
        if route == "request_route" and self.native:
            out.append(f'{indent}python_exec("tlsb_protect_replies");  '
                       f"{MARK} replies to TLS peers: over the hairpin or nowhere")
            self.note(i, "request_route starts with python_exec(\"tlsb_protect_replies\")")
        elif route.startswith("branch_route") and self.native:
            out.append(f'{indent}python_exec("tlsb_branch");  '
                       f"{MARK} this branch's transport and Record-Route")
            self.branch_routes.append(route[len("branch_route["):-1])
            self.note(i, f'{route} calls python_exec("tlsb_branch")')

    def _routing_line(self, line: str, route: str | None, out: list[str], i: int) -> str:
        indent = re.match(r"\s*", line).group(0)  # type: ignore[union-attr]
        if re.search(r"\brecord_route\s*\(\s*\)", line):
            self.note(i, 'record_route() -> python_exec("tlsb_record_route")')
            line = re.sub(r"\brecord_route\s*\(\s*\)", 'python_exec("tlsb_record_route")', line)
        if re.search(r"\bsave\s*\(", line):
            out.append(f'{indent}python_exec("tlsb_register");  '
                       f"{MARK} reached over its TLS connection")
            self.note(i, 'python_exec("tlsb_register") before save()')
        if re.search(r"\bt_relay\s*\(", line):
            name = route[len("route["):-1] if route and route.startswith("route[") else None
            if name is None:
                self.note(i, f"t_relay() in {route}, not in a route[NAME] to resume: "
                          "move it into one and call python_exec(\"tlsb_relay\", NAME) first")
            else:
                out.append(f'{indent}if (!python_exec("tlsb_relay", "{name}")) exit;  '
                           f"{MARK} TLS targets over the bridge")
                out.append(f'{indent}if (!t_is_set("branch_route")) '
                           f't_on_branch("{{BRANCH}}");  {MARK} every branch decides its own')
                self.note(i, f'python_exec("tlsb_relay", "{name}") before t_relay()')
        return line


def _bridge_block(opts: Options, cfg: KamailioCfg, native: bool) -> list[str]:
    block = ["", "####### tlsbridge: the daemon does TLS (docs/migration.md) #######"]
    if not any(li.serves("udp") for li in cfg.listens) and opts.sip_address:
        block.append(f"listen=udp:{opts.sip_address}")
    block += [
        f"listen=tcp:{opts.hairpin}   # the hairpin: loopback only",
        f"alias=tls:{opts.tls_address}   # the daemon's public TLS address is Kamailio's own",
        "enable_tls=no",
        "tcp_accept_haproxy=yes   # global: run no other plain TCP listener",
        "tcp_defer_accept=3",
        "tcp_wait_data=500",
        "tcp_no_connect=yes   # Kamailio never connects out over TCP: nothing leaks in plaintext",
    ]
    for module in ("htable", "rtimer", "tcpops", "app_python3"):
        block += [f"#!ifndef MOD_{module}", f'loadmodule "{module}.so"', "#!endif"]
    timer = TIMER_ROUTE if native else "ksr_tlsb_timer"
    block += [
        'modparam("htable", "htable", "tlsb=>size=14;autoexpire=0;")',
        'modparam("rtimer", "timer", "name=tlsb;interval=50000u;mode=1")',
        f'modparam("rtimer", "exec", "timer=tlsb;route={timer}")',
        f'modparam("registrar", "received_avp", "{DEFAULT_RECEIVED_AVP}")',
        'modparam("rr", "enable_socket_mismatch_warning", 0)',
    ]
    if native and cfg.modparam("app_python3", "load") is None:
        block.append(f'modparam("app_python3", "load", "{opts.script}")')
    return [*block, ""]


def migrate(path: Path, opts: Options, defines: Sequence[str] = ()) -> Migration:
    """Migrate `path` and the local files it includes; nothing is written here."""
    cfg = load_cfg(path, defines)
    result = Migration()
    native = cfg.cfgengine is None
    script = Path(opts.script) if opts.script else path.parent / "tlsbridge_native.py"
    opts = dataclasses.replace(opts, script=str(script))
    if native and cfg.modparam("app_python3", "load") is None and not script.exists():
        # This interpreter's site-packages: a wheel's tlsbridge, or an editable install's
        # .pth (site.addsitedir follows it).
        result.files[script] = SCRIPT.format(site_packages=sysconfig.get_paths()["purelib"],
                                             config=opts.bridge_config)
        result.notes.append(f"{script}: written (app_python3 loads it)")
    if cfg.cfgengine and any(name for name in cfg.routes() if name != "event_route"):
        result.notes.append(f"{path}: cfgengine \"{cfg.cfgengine}\" beside native routes: "
                            "Kamailio runs one or the other; remove one of them")
    hairpin = format_addr(*parse_addr(opts.hairpin))
    migrators = []
    for p in [path, *_included(path)]:
        m = _FileMigrator(p, p.read_text(), opts, native, hairpin, result.notes)
        m.rewrite()
        migrators.append(m)
    branches = [b for m in migrators for b in m.branch_routes]
    main = migrators[0]
    branch = branches[0] if branches else BRANCH_ROUTE
    if native and not branches:
        main.lines += ["", f"branch_route[{BRANCH_ROUTE}] {{",
                       '\tpython_exec("tlsb_branch");  # tlsbridge: transport and Record-Route',
                       "}"]
        result.notes.append(f"{path}: added branch_route[{BRANCH_ROUTE}]")
    if native:
        main.lines += ["", f"{MARK} the rtimer route: the daemon's events, and transactions "
                       "waiting for a TLS connect", *TIMER_BLOCK.splitlines()]
    at = _after_last_loadmodule(main.lines)
    main.lines[at:at] = _bridge_block(opts, cfg, native)
    if not any(li.serves("udp") for li in cfg.listens) and not opts.sip_address:
        result.notes.append(f"{path}: no UDP listener and no --sip-address: Kamailio would "
                            "listen on the hairpin only")
    for m in migrators:
        result.files[m.path] = "\n".join(m.lines).replace("{BRANCH}", branch) + "\n"
    return result


def _included(path: Path) -> list[Path]:
    out = []
    for name in _INCLUDE.findall(path.read_text()):
        p = (path.parent / name) if not name.startswith("/") else Path(name)
        if p.is_file():
            out.append(p)
    return out


def _after_last_loadmodule(lines: list[str]) -> int:
    depth = _ifdef_depth(lines)
    last = max((i for i, ln in enumerate(lines) if re.match(r'\s*loadmodule\s+"', ln)),
               default=None)
    if last is None:
        return next((i for i, ln in enumerate(lines) if _BLOCK.match(ln)), len(lines))
    i = last + 1
    while i < len(lines) and depth[i] > 0:
        i += 1
    return i


def main_migrate(path: str, opts: Options, defines: Sequence[str], in_place: bool,
                 out_dir: str | None) -> int:
    import sys

    src = Path(path)
    try:
        result = migrate(src, opts, defines)
    except (OSError, ValueError) as exc:
        print(f"tlsbridge: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(note, file=sys.stderr)
    for p, text in result.files.items():
        if in_place:
            backup = p.with_name(p.name + ".pre-tlsbridge")
            if p.exists() and not backup.exists():
                backup.write_text(p.read_text())
            p.write_text(text)
        elif out_dir:
            target = Path(out_dir) / p.relative_to(src.parent) if p.is_relative_to(
                src.parent) else Path(out_dir) / p.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        elif p == src:
            sys.stdout.write(text)
    return 0
