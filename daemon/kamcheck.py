"""Checks on the Kamailio side: is the hairpin listener there, and does kamailio.cfg have what
the bridge needs. Findings are (level, message) with level "ok", "warning" or "error"."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from tlsbridge.daemon.config import Config
from tlsbridge.shared.addr import format_addr

Finding = tuple[str, str]


def probe_hairpin(config: Config, timeout: float = 2.0) -> Finding:
    """Connect like a hairpin and send a CRLF keep-alive after a PROXY header: a Kamailio with
    tcp_accept_haproxy answers CRLF. (A connection that stays silent would stall its tcp_main.)"""
    hp = config.hairpin
    where = format_addr(hp.host, hp.port)
    try:
        with socket.create_connection((hp.host, hp.port), timeout=timeout) as s:
            s.sendall(b"PROXY UNKNOWN\r\n")
            s.sendall(b"\r\n\r\n")
            s.settimeout(timeout)
            answer = s.recv(16)
    except OSError as exc:
        return "error", f"Kamailio's hairpin listener {where} does not answer: {exc}"
    if answer.startswith(b"\r\n"):
        return "ok", f"Kamailio answers on the hairpin listener {where}"
    return "warning", f"{where} accepted but did not answer a CRLF keep-alive (tcp_crlf_ping?)"


def check_cfg(text: str, config: Config) -> list[Finding]:
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()
             if not ln.lstrip().startswith(("#!", "//"))]
    body = "\n".join(lines)
    out: list[Finding] = []

    def setting(name: str) -> str | None:
        m = re.search(rf"^\s*{name}\s*=\s*\"?([^\"\n]+?)\"?\s*$", body, re.M)
        return m.group(1).strip() if m else None

    want = {"tcp_accept_haproxy": "yes", "enable_tls": "no"}
    for name, value in want.items():
        got = setting(name)
        if got is None and name == "enable_tls":
            continue
        level = "ok" if got in (value, "1" if value == "yes" else "0") else "error"
        out.append((level, f"{name} = {got!r} (the bridge needs {value})"))
    no_connect = setting("tcp_no_connect")
    out.append(("ok" if no_connect in ("yes", "1") else "warning",
                f"tcp_no_connect = {no_connect!r}: with yes, a reply to a TLS peer whose "
                "connection is gone can never leave in plaintext"))
    defer = setting("tcp_defer_accept")
    out.append(("ok" if defer not in (None, "0", "no") else "warning",
                f"tcp_defer_accept = {defer!r}: without it one silent connection stalls new ones"))
    if re.search(r'loadmodule\s+"(?:[^"]*/)?tls\.so"', body):
        out.append(("error", "tls.so is loaded: TLS is the bridge's job; remove it"))
    if not re.search(r"^\s*alias\s*=\s*\"?tls:", body, re.M):
        out.append(("warning", "no alias=tls:<public address>: in-dialog requests from TLS peers "
                    "will not be recognised as addressed to Kamailio"))
    hp = (config.hairpin.host, str(config.hairpin.port))
    tcp = re.findall(r"^\s*listen\s*=\s*tcp:([^\s]+)", body, re.M)
    others = [t for t in tcp if not t.endswith(f":{hp[1]}") and "HAIRPIN" not in t]
    if others:
        # tcp_accept_haproxy is global: every TCP listener believes PROXY headers.
        out.append(("warning", f"other plain TCP listeners ({', '.join(others)}) would also "
                    "believe PROXY headers: anyone reaching them can claim any address"))
    if not tcp:
        out.append(("warning", "no listen=tcp: line found for the hairpin listener"))
    return out


def check_cfg_file(path: Path, config: Config) -> list[Finding]:
    try:
        return check_cfg(path.read_text(), config)
    except OSError as exc:
        return [("error", f"cannot read {path}: {exc.strerror}")]


_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def filesystem_of(path: Path, mounts: str) -> str:
    """The type of the filesystem holding `path`, from the text of /proc/mounts."""
    best, fstype = "", "unknown"
    target = str(path.resolve())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def check_run_dir(config: Config, mounts: str | None = None) -> Finding:
    """Kamailio's workers read each connection's facts from the facts map in run_dir: on a
    disk it costs writeback for nothing."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "ok", f"run_dir {config.run_dir}: filesystem unknown"
    fstype = filesystem_of(config.run_dir, mounts)
    if fstype in _MEMORY_FILESYSTEMS:
        return "ok", f"run_dir {config.run_dir} is on {fstype}"
    return "warning", (f"run_dir {config.run_dir} is on {fstype}, not tmpfs: the facts map "
                       "there is written for every connection; put run_dir on a tmpfs "
                       "(/run on most systems)")


def warn_at_start(config: Config) -> None:
    """What an operator must know before the first connection: logged, never fatal."""
    import ipaddress
    import logging

    log = logging.getLogger("tlsbridge")
    try:
        loopback = ipaddress.ip_address(config.hairpin.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning("the hairpin target %s is not loopback: anything that reaches Kamailio's "
                    "TCP listener there can claim any source address", config.hairpin.host)
    if config.hairpin.cfg is not None:
        for level, message in check_cfg_file(config.hairpin.cfg, config):
            if level != "ok":
                log.warning("%s: %s", config.hairpin.cfg, message)
