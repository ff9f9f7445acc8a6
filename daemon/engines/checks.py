"""What every engine checks alike in a profile, with errors naming the profile and the key or
file: OpenSSL-style name lists, PEM CRL files, and our own certificate.

Below the engines and the registry (it imports neither), so each engine takes these from here
and the registry stays the one module that knows every engine.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from cryptography import x509

from tlsbridge.daemon.certinfo import cert_info_from_pem_file
from tlsbridge.daemon.config import ConfigError
from tlsbridge.shared.facts import CertInfo

__all__ = ["PathLike", "listed", "pem_crls", "usable_certificate"]

PathLike = str | os.PathLike[str]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def listed(where: str, key: str, value: str) -> list[str]:
    """The names of an OpenSSL-style list ("A:B"); each must be a plain name (no OpenSSL
    operators such as `?name`, which would ignore an unknown one). Raises ConfigError."""
    names = [n.strip() for n in value.split(":")]
    for n in names:
        if not _NAME.fullmatch(n):
            raise ConfigError(f"{where}: '{key}': {n!r} is not a name (in {value!r})")
    return names


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def pem_crls(where: str, path: PathLike) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file; none at all is an error. Raises ConfigError."""
    try:
        blocks = _PEM_CRL.findall(Path(path).read_bytes())
        crls = [x509.load_pem_x509_crl(b) for b in blocks]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: CRL {os.fspath(path)} unusable: {exc}") from None
    if not crls:
        raise ConfigError(f"{where}: CRL {os.fspath(path)} unusable: no PEM CRL in it")
    return crls


def usable_certificate(where: str, path: PathLike) -> CertInfo:
    """Our own certificate, parsed; one that has expired refuses start-up and reload (every
    engine would serve it otherwise). Raises ConfigError."""
    try:
        info = cert_info_from_pem_file(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: certificate {os.fspath(path)}: {exc}") from None
    if info.not_after_ts < time.time():
        raise ConfigError(f"{where}: certificate {os.fspath(path)} expired on {info.not_after}")
    return info
