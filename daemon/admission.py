"""Connection limits: how many inbound connections in all, and from one IP address."""

from __future__ import annotations

import collections


class Admission:
    """Counts admitted connections until they are released; sans-IO."""

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip  # 0: unlimited
        self.active = 0
        self.per_ip: collections.Counter[str] = collections.Counter()

    def admit(self, ip: str) -> str | None:
        """None and counted, or why not: too_many_connections / too_many_from_ip."""
        if self.active >= self.max_connections:
            return "too_many_connections"
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip:
            return "too_many_from_ip"
        self.active += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        if self.per_ip.get(ip, 0) <= 0:
            return  # not admitted here (e.g. before a restart): nothing to give back
        self.active -= 1
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]
