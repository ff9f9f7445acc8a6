"""Test PKI beyond what trustme makes: certificate revocation lists."""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization


def write_crl(ca: trustme.CA, revoked: trustme.LeafCert, path: Path) -> None:
    """A CRL of `ca`, valid now, that revokes `revoked`, written to `path` as PEM."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    leaf = x509.load_pem_x509_certificate(revoked.cert_chain_pems[0].bytes())
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(leaf.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=1)).build())
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
