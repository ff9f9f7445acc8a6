"""What a reload changes, which files to watch, and which certificates are about to expire."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlsbridge.daemon.certinfo import cert_info_from_pem_file
from tlsbridge.daemon.config import Config
from tlsbridge.shared import events as ev

log = logging.getLogger("tlsbridge")
EXPIRY_CHECK_INTERVAL = 12 * 3600

# Settings a running daemon cannot take over: they need a restart.
RESTART_ONLY = ("run_dir", "events_endpoint", "control_endpoint", "events_hwm")


def _files(config: Config) -> Iterator[tuple[str, Path]]:
    for name, p in config.profiles.items():
        for path in (p.certificate, p.private_key, p.ca_list, p.crl):
            if path is not None:
                yield f"profile.{name}", path
    for name, c in config.clients.items():
        for path in (c.certificate, c.private_key, c.ca_list, c.crl):
            if path is not None:
                yield f"client.{name}", path


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def fingerprints(config: Config) -> dict[str, str]:
    """One digest per profile over the files it uses: a renewed certificate is a change."""
    parts: dict[str, list[str]] = {}
    for owner, path in _files(config):
        parts.setdefault(owner, []).append(_digest(path))
    return {owner: hashlib.sha256("".join(d).encode()).hexdigest() for owner, d in parts.items()}


@dataclass(frozen=True, slots=True)
class Changes:
    changed: list[str]
    restart_needed: list[str]

    def to_dict(self) -> dict[str, list[str]]:
        return {"changed": self.changed, "restart_needed": self.restart_needed}


def diff(old: Config, new: Config, old_fp: dict[str, str], new_fp: dict[str, str]) -> Changes:
    changed: list[str] = []
    for kind, before, after in (("profile", old.profiles, new.profiles),
                                ("client", old.clients, new.clients)):
        for name in sorted(before.keys() | after.keys()):
            key = f"{kind}.{name}"
            if before.get(name) != after.get(name) or old_fp.get(key) != new_fp.get(key):
                changed.append(key)
    old_l = {lst.address: lst for lst in old.listeners}
    new_l = {lst.address: lst for lst in new.listeners}
    changed += [f"listener {a}" for a in sorted(old_l.keys() | new_l.keys())
                if old_l.get(a) != new_l.get(a)]
    for key in ("hairpin", "outbound", "handshake_timeout", "max_buffer", "log_level"):
        if getattr(old, key) != getattr(new, key):
            changed.append(key)
    restart = [k for k in RESTART_ONLY if getattr(old, k) != getattr(new, k)]
    return Changes(changed, restart)


def watched_mtimes(config: Config) -> dict[Path, float]:
    paths = [config.path, *(p for _, p in _files(config))]
    out = {}
    for p in paths:
        try:
            out[p] = os.stat(p).st_mtime
        except OSError:
            out[p] = -1.0
    return out


@dataclass(frozen=True, slots=True)
class Expiring:
    owner: str
    path: str
    not_after: str
    days_left: float
    not_after_ts: float


def expiring(config: Config, within_days: float, now: float | None = None) -> list[Expiring]:
    now = time.time() if now is None else now
    out = []
    seen = set()
    for owner, path in _files(config):
        if path in seen:
            continue
        seen.add(path)
        try:
            info = cert_info_from_pem_file(path)
        except (OSError, ValueError):
            continue  # keys, CRLs: not certificates
        days = (info.not_after_ts - now) / 86400
        if days <= within_days:
            out.append(Expiring(owner, str(path), info.not_after, round(days, 2),
                                info.not_after_ts))
    return out


def publish_expiring(config: Config, publish: Callable[[ev.CertExpiring], None]) -> None:
    """Log and publish cert.expiring for each certificate within cert_expiry_days."""
    for e in expiring(config, config.cert_expiry_days):
        log.warning("certificate %s (%s) expires %s: %.1f days left",
                    e.path, e.owner, e.not_after, e.days_left)
        publish(ev.CertExpiring(e.owner, e.path, e.not_after, e.days_left))


async def check_expiry_forever(config: Callable[[], Config],
                               publish: Callable[[ev.CertExpiring], None]) -> None:
    while True:
        publish_expiring(config(), publish)
        await asyncio.sleep(EXPIRY_CHECK_INTERVAL)


def metrics_snapshot(config: Config, counters: dict[str, int], open_in: int, open_out: int,
                     bytes_open: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """What daemon/metrics.py reads at a scrape, from a process's counters."""
    return {
        "counters": counters,
        "open_in": open_in,
        "open_out": open_out,
        "bytes_in_total": counters.get("bytes_in_closed", 0) + bytes_open[0],
        "bytes_out_total": counters.get("bytes_out_closed", 0) + bytes_open[1],
        "certificates": [(e.owner, e.path, e.not_after_ts)
                         for e in expiring(config, float("inf"))],
    }
