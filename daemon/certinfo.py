"""Describe X.509 certificates as the facts model's `CertInfo` (ours from PEM files, a peer's
from DER).

Each engine builds its `TlsFacts` from these (the openssl engine: `facts_from_ssl`).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tlsbridge.shared.facts import CertInfo, DistinguishedName

__all__ = ["cert_info_from_der", "cert_info_from_pem_file"]


def _first(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return None
    value = attrs[0].value
    # Only X500UniqueIdentifier carries bytes; keep the model all-str anyway.
    return value.hex() if isinstance(value, bytes) else value


def _dn(name: x509.Name) -> DistinguishedName:
    return DistinguishedName(
        line=name.rfc4514_string(),
        cn=_first(name, NameOID.COMMON_NAME),
        o=_first(name, NameOID.ORGANIZATION_NAME),
        ou=_first(name, NameOID.ORGANIZATIONAL_UNIT_NAME),
        c=_first(name, NameOID.COUNTRY_NAME),
        st=_first(name, NameOID.STATE_OR_PROVINCE_NAME),
        l=_first(name, NameOID.LOCALITY_NAME),
        uid=_first(name, NameOID.USER_ID),
        email=_first(name, NameOID.EMAIL_ADDRESS),
    )


def _iso_utc(dt: datetime) -> str:
    # isoformat() zero-pads the year, unlike strftime("%Y") on glibc.
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:
        # Bad signature, or a key/signature type cryptography cannot check.
        return False
    return True


def _cert_info(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    return CertInfo(
        subject=_dn(cert.subject),
        issuer=_dn(cert.issuer),
        serial=format(cert.serial_number, "X"),
        version=cert.version.value + 1,
        not_before=_iso_utc(cert.not_valid_before_utc),
        not_after=_iso_utc(cert.not_valid_after_utc),
        san_dns=tuple(san.get_values_for_type(x509.DNSName)),
        san_uri=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        san_email=tuple(san.get_values_for_type(x509.RFC822Name)),
        san_ip=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        pem=cert.public_bytes(Encoding.PEM).decode("ascii"),
        self_signed=_is_self_signed(cert),
    )


# cryptography signals some unparseable certificates with exceptions that are not
# ValueError; callers get a single exception type.
_PARSE_ERRORS = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def cert_info_from_der(der: bytes) -> CertInfo:
    """Describe a DER-encoded certificate; raises ValueError if it cannot be parsed."""
    try:
        return _cert_info(x509.load_der_x509_certificate(der))
    except ValueError:
        raise
    except _PARSE_ERRORS as exc:
        raise ValueError(f"unparseable certificate: {exc}") from exc


def cert_info_from_pem_file(path: str | os.PathLike[str]) -> CertInfo:
    """Describe the first certificate in a PEM file (other PEM blocks, e.g. keys, are skipped).

    Raises OSError if the file cannot be read, ValueError if it holds no usable certificate.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _cert_info(x509.load_pem_x509_certificates(data)[0])
    except ValueError:
        raise
    except _PARSE_ERRORS as exc:
        raise ValueError(f"{os.fspath(path)}: unparseable certificate: {exc}") from exc
