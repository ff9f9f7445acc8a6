"""Checks on the Kamailio side: is the hairpin listener there, and does kamailio.cfg have what
the bridge needs. Findings are (level, message) with level "ok", "warning" or "error"."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from tlsbridge.daemon.config import Config
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.kamcfg import CfgError, load_cfg
from tlsbridge.shared.kamreview import review_cfg
from tlsbridge.shared.settings import load_settings

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


def check_cfg_file(path: Path, config: Config, defines: Sequence[str] = ()) -> list[Finding]:
    """Review kamailio.cfg as Kamailio evaluates it (`--cfg-print`: #!ifdef, include_file,
    import_file; `defines` as Kamailio's -A)."""
    try:
        cfg = load_cfg(path, defines)
    except CfgError as exc:
        return [("error", str(exc))]
    return review_cfg(cfg, load_settings(config.path))


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
