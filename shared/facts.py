"""TLS facts: what tlsbridge publishes about each TLS connection.

These mirror the Kamailio tls module's ``$tls_*`` pseudo-variables. This module is
also imported inside Kamailio's embedded Python, so it must use only the standard
library.

Every class converts to and from a plain dict holding only str/int/bool/None/list/dict
(msgpack- and JSON-friendly). ``from_dict`` ignores unknown keys so that older readers
accept newer writers; a key whose field may be None may also be absent (read as None)
so that newer readers accept older writers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

FACTS_VERSION = 1
"""Version of the dict layout produced by ``to_dict``."""

VERIFY_ERROR_NO_PEER_CERT = "no peer certificate"
"""``TlsFacts.verify_error`` when the peer sent no certificate."""

VERIFY_ERROR_NOT_VERIFIED = "verification disabled"
"""``TlsFacts.verify_error`` when the peer's certificate was not checked (CERT_NONE)."""

_MISSING = object()


class UnknownLocalCertificate(ValueError):
    """Facts that name our own certificate by fingerprint, to a reader that lacks it."""


def _get(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str,
         *, optional: bool = False) -> Any:
    value = d.get(key, _MISSING)
    if value is _MISSING:
        if optional:
            return None
        raise ValueError(f"{where}: missing required key {key!r}")
    if value is None and optional:
        return None
    # bool is an int subclass; an int field must not silently accept True/False.
    if not isinstance(value, types) or (types is int and isinstance(value, bool)):
        names = types.__name__ if isinstance(types, type) else "/".join(
            t.__name__ for t in types)
        if optional:
            names += " or None"
        raise ValueError(
            f"{where}: key {key!r} must be {names}, got {type(value).__name__}")
    return value


def _get_str_tuple(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    # msgpack and JSON both turn tuples into lists, so accept either.
    seq = _get(d, key, (list, tuple), where)
    for i, item in enumerate(seq):
        if not isinstance(item, str):
            raise ValueError(
                f"{where}: key {key!r} item {i} must be str, got {type(item).__name__}")
    return tuple(seq)


def _check_mapping(d: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
    return d


def _parse_utc(value: str) -> datetime:
    dt = datetime.fromisoformat(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


@dataclass(frozen=True, slots=True)
class DistinguishedName:
    """An X.509 name: its RFC 4514 one-line form and the first value of common attributes."""

    line: str
    cn: str | None
    o: str | None
    ou: str | None
    c: str | None
    st: str | None
    l: str | None  # noqa: E741 -- the X.509 attribute is called L
    uid: str | None
    email: str | None

    def to_dict(self) -> dict[str, Any]:
        """Return a plain dict (JSON/msgpack friendly)."""
        return {
            "line": self.line,
            "cn": self.cn,
            "o": self.o,
            "ou": self.ou,
            "c": self.c,
            "st": self.st,
            "l": self.l,
            "uid": self.uid,
            "email": self.email,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistinguishedName:
        """Inverse of ``to_dict``; raises ValueError on a missing key or wrong type."""
        return cls._from_dict(d, cls.__name__)

    @classmethod
    def _from_dict(cls, d: Any, where: str) -> DistinguishedName:
        d = _check_mapping(d, where)
        return cls(
            line=_get(d, "line", str, where),
            cn=_get(d, "cn", str, where, optional=True),
            o=_get(d, "o", str, where, optional=True),
            ou=_get(d, "ou", str, where, optional=True),
            c=_get(d, "c", str, where, optional=True),
            st=_get(d, "st", str, where, optional=True),
            l=_get(d, "l", str, where, optional=True),
            uid=_get(d, "uid", str, where, optional=True),
            email=_get(d, "email", str, where, optional=True),
        )


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What is known about one X.509 certificate."""

    subject: DistinguishedName
    issuer: DistinguishedName
    serial: str
    """Uppercase hex, no ``0x``."""
    version: int
    """X.509 version, 1..3."""
    not_before: str
    """ISO 8601 UTC, e.g. ``2026-11-26T20:00:00Z``."""
    not_after: str
    san_dns: tuple[str, ...]
    san_uri: tuple[str, ...]
    san_email: tuple[str, ...]
    san_ip: tuple[str, ...]
    fingerprint_sha256: str
    """Uppercase hex pairs separated by ``:``."""
    pem: str
    self_signed: bool

    @property
    def not_before_ts(self) -> float:
        """``not_before`` as seconds since the epoch."""
        return _parse_utc(self.not_before).timestamp()

    @property
    def not_after_ts(self) -> float:
        """``not_after`` as seconds since the epoch."""
        return _parse_utc(self.not_after).timestamp()

    def expired_at(self, ts: float) -> bool:
        """True if the certificate is past its notAfter at epoch time ``ts``."""
        # notAfter itself is still inside the validity period (RFC 5280 4.1.2.5).
        return ts > self.not_after_ts

    def to_dict(self) -> dict[str, Any]:
        """Return a plain dict (JSON/msgpack friendly)."""
        return {
            "subject": self.subject.to_dict(),
            "issuer": self.issuer.to_dict(),
            "serial": self.serial,
            "version": self.version,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "san_dns": list(self.san_dns),
            "san_uri": list(self.san_uri),
            "san_email": list(self.san_email),
            "san_ip": list(self.san_ip),
            "fingerprint_sha256": self.fingerprint_sha256,
            "pem": self.pem,
            "self_signed": self.self_signed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CertInfo:
        """Inverse of ``to_dict``; raises ValueError on a missing key or wrong type."""
        return cls._from_dict(d, cls.__name__)

    @classmethod
    def _from_dict(cls, d: Any, where: str) -> CertInfo:
        d = _check_mapping(d, where)
        return cls(
            subject=DistinguishedName._from_dict(
                _get(d, "subject", Mapping, where), f"{where}.subject"),
            issuer=DistinguishedName._from_dict(
                _get(d, "issuer", Mapping, where), f"{where}.issuer"),
            serial=_get(d, "serial", str, where),
            version=_get(d, "version", int, where),
            not_before=_get(d, "not_before", str, where),
            not_after=_get(d, "not_after", str, where),
            san_dns=_get_str_tuple(d, "san_dns", where),
            san_uri=_get_str_tuple(d, "san_uri", where),
            san_email=_get_str_tuple(d, "san_email", where),
            san_ip=_get_str_tuple(d, "san_ip", where),
            fingerprint_sha256=_get(d, "fingerprint_sha256", str, where),
            pem=_get(d, "pem", str, where),
            self_signed=_get(d, "self_signed", bool, where),
        )


@dataclass(frozen=True, slots=True)
class TlsFacts:
    """The TLS facts of one connection, as seen from tlsbridge's side of it."""

    version: str
    """Protocol, e.g. ``TLSv1.3``."""
    cipher: str
    """OpenSSL cipher name."""
    cipher_bits: int
    sni: str | None
    alpn: str | None
    resumed: bool
    peer_cert_present: bool
    peer_verified: bool
    verify_error: str | None
    peer: CertInfo | None
    local: CertInfo | None
    """Our own certificate, if we presented one."""
    engine: str
    """TLS library that produced these facts, e.g. ``openssl``."""

    def to_dict(self, *, local_by_reference: bool = False) -> dict[str, Any]:
        """Return a plain dict (JSON/msgpack friendly).

        ``local_by_reference``: our own certificate as its fingerprint alone, for readers that
        know it already (see ``from_dict``'s ``known_local``).
        """
        local: dict[str, Any] | None = None
        if self.local is not None:
            local = {"fingerprint_sha256": self.local.fingerprint_sha256} \
                if local_by_reference else self.local.to_dict()
        return {
            "version": self.version,
            "cipher": self.cipher,
            "cipher_bits": self.cipher_bits,
            "sni": self.sni,
            "alpn": self.alpn,
            "resumed": self.resumed,
            "peer_cert_present": self.peer_cert_present,
            "peer_verified": self.peer_verified,
            "verify_error": self.verify_error,
            "peer": None if self.peer is None else self.peer.to_dict(),
            "local": local,
            "engine": self.engine,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any],
                  known_local: dict[str, CertInfo] | None = None) -> TlsFacts:
        """Inverse of ``to_dict``; raises ValueError on a missing key or wrong type.

        ``known_local`` (fingerprint -> CertInfo), when given, is where our own certificates
        are taken from and added to: every connection of a profile shares one object. A
        reference to one it lacks raises ``UnknownLocalCertificate``.
        """
        where = cls.__name__
        d = _check_mapping(d, where)
        peer = _get(d, "peer", Mapping, where, optional=True)
        local = _get(d, "local", Mapping, where, optional=True)
        local_info = None
        if local is not None:
            local_info = known_local.get(local.get("fingerprint_sha256")) \
                if known_local is not None else None
            if local_info is None and local.keys() == {"fingerprint_sha256"}:
                raise UnknownLocalCertificate(f"{where}.local: a reference to a certificate "
                                              "not known here")
            if local_info is None:
                local_info = CertInfo._from_dict(local, f"{where}.local")
                if known_local is not None:
                    known_local[local_info.fingerprint_sha256] = local_info
        return cls(
            version=_get(d, "version", str, where),
            cipher=_get(d, "cipher", str, where),
            cipher_bits=_get(d, "cipher_bits", int, where),
            sni=_get(d, "sni", str, where, optional=True),
            alpn=_get(d, "alpn", str, where, optional=True),
            resumed=_get(d, "resumed", bool, where),
            peer_cert_present=_get(d, "peer_cert_present", bool, where),
            peer_verified=_get(d, "peer_verified", bool, where),
            verify_error=_get(d, "verify_error", str, where, optional=True),
            peer=None if peer is None else CertInfo._from_dict(peer, f"{where}.peer"),
            local=local_info,
            engine=_get(d, "engine", str, where),
        )
