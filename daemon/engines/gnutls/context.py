"""GnuTLS contexts: the credentials (our certificate, trust, CRLs) and priorities a profile
gives every session of one side, built once per profile.

CRLs: GnuTLS checks the CRLs it has against the whole chain; as with the openssl engine
(VERIFY_CRL_CHECK_LEAF), a peer certificate (a client's, or on the client side the server's)
whose issuer has no CRL in `crl` is refused (the session's verify callback does that, with the
issuers recorded here). Client profiles take the same priority (versions, ciphers, TLS 1.3
suites, groups), trust and CRL helpers as server profiles.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Sequence
from ctypes import byref, c_char_p, c_void_p

from tlsbridge.daemon.certinfo import cert_info_from_pem_file
from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines.checks import pem_crls
from tlsbridge.daemon.engines.gnutls import binding
from tlsbridge.daemon.engines.gnutls.binding import X509_FMT_PEM, Datum, check, need_lib, strerror
from tlsbridge.daemon.engines.gnutls.priority import priority
from tlsbridge.daemon.sni import SniRouter
from tlsbridge.shared.facts import CertInfo

__all__ = [
    "SERVER_VERIFY_MODES", "GnuTLSContext", "client_context", "listener_context", "server_context",
]

SERVER_VERIFY_MODES = ("off", "optional", "on", "optional_no_ca")

Profile = ServerProfile | ClientProfile


class GnuTLSContext:
    """Credentials and priorities shared by all sessions of one side; build with
    `server_context` or `client_context`. Sessions keep it alive; `free()` is idempotent."""

    def __init__(
        self,
        *,
        server_side: bool,
        priority: str,
        verify: str,
        alpn: Sequence[str] = (),
        verify_depth: int = 9,
        local_cert: CertInfo | None = None,
        name: str = "",
    ) -> None:
        lib = need_lib()
        self.server_side = server_side
        self.verify = verify
        self.priority_string = priority
        self.local_cert = local_cert
        self.name = name  # the profile's
        # Issuers (DER names) that `crl` has a CRL of; a peer from another issuer is refused.
        self.crl_issuers: frozenset[bytes] = frozenset()
        # The profiles a listener chooses from by SNI; None: this context serves every name.
        self.sni: SniRouter[GnuTLSContext] | None = None
        self.cred: c_void_p | None = None
        self.prio: c_void_p | None = None
        cred = c_void_p()
        check(lib.gnutls_certificate_allocate_credentials(byref(cred)), "credentials")
        self.cred = cred
        # GnuTLS counts every certificate of the chain; OpenSSL's depth counts intermediates.
        lib.gnutls_certificate_set_verify_limits(cred, 16384, verify_depth + 2)
        prio, err_pos = c_void_p(), c_char_p()
        rc = lib.gnutls_priority_init(byref(prio), priority.encode(), byref(err_pos))
        if rc < 0:
            at = f" at '{err_pos.value.decode()}'" if err_pos.value else ""
            raise ValueError(f"GnuTLS priority '{priority}' refused{at}: {strerror(rc)}")
        self.prio = prio
        # GnuTLS copies the protocols into each session; the buffers live as long as we do.
        self._alpn_bufs = [ctypes.create_string_buffer(p.encode(), len(p.encode())) for p in alpn]
        self.alpn = (Datum * len(alpn))(
            *(Datum(ctypes.cast(b, c_void_p), len(b)) for b in self._alpn_bufs)
        )

    def load_key_pair(self, cert: str | os.PathLike[str], key: str | os.PathLike[str],
                      password: str | None = None) -> None:
        """Our certificate chain and key (PEM, encrypted with `password`); raises ValueError
        with GnuTLS's reason."""
        rc = need_lib().gnutls_certificate_set_x509_key_file2(
            self.cred, os.fsencode(cert), os.fsencode(key), X509_FMT_PEM,
            password.encode() if password is not None else None, 0
        )
        if rc < 0:
            raise ValueError(strerror(rc))

    def load_trust(self, ca_file: str | os.PathLike[str] | None) -> None:
        """Trust the CAs of a PEM file (None: the system's); raises ValueError."""
        lib = need_lib()
        if ca_file is None:
            rc = lib.gnutls_certificate_set_x509_system_trust(self.cred)
        else:
            rc = lib.gnutls_certificate_set_x509_trust_file(
                self.cred, os.fsencode(ca_file), X509_FMT_PEM
            )
        if rc < 0:
            raise ValueError(strerror(rc))
        if rc == 0 and ca_file is not None:
            raise ValueError("no certificate in the file")

    def load_trust_dir(self, ca_path: str | os.PathLike[str]) -> None:
        """Trust every PEM certificate in a directory (hashed or not); raises ValueError."""
        rc = need_lib().gnutls_certificate_set_x509_trust_dir(
            self.cred, os.fsencode(ca_path), X509_FMT_PEM)
        if rc < 0:
            raise ValueError(strerror(rc))

    def load_crl(self, crl: str | os.PathLike[str], issuers: frozenset[bytes]) -> None:
        """Check peers against the CRLs of a PEM file, whose issuers are `issuers`; raises
        ValueError."""
        rc = need_lib().gnutls_certificate_set_x509_crl_file(
            self.cred, os.fsencode(crl), X509_FMT_PEM)
        if rc < 0:
            raise ValueError(strerror(rc))
        if rc == 0:
            raise ValueError("no CRL in the file")
        self.crl_issuers = issuers

    def free(self) -> None:
        """Release the GnuTLS objects; only once no session uses them."""
        lib = binding.LIB
        if lib is None:
            return
        if self.prio is not None:
            lib.gnutls_priority_deinit(self.prio)
            self.prio = None
        if self.cred is not None:
            lib.gnutls_certificate_free_credentials(self.cred)
            self.cred = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn ctypes down
            self.free()


def server_context(profile: ServerProfile) -> GnuTLSContext:
    """A server context for `profile`; raises ConfigError naming the profile and the file."""
    where = f"profile '{profile.name}'"
    need_lib()
    if profile.verify_client not in SERVER_VERIFY_MODES:
        raise ConfigError(f"{where}: verify_client {profile.verify_client!r} is not one of "
                          f"{', '.join(SERVER_VERIFY_MODES)}")
    try:
        ctx = GnuTLSContext(
            server_side=True,
            priority=priority(where, profile),
            verify=profile.verify_client,
            alpn=profile.alpn,
            verify_depth=profile.verify_depth,
            name=profile.name,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _identity(where, ctx, profile)
    _trust(where, ctx, profile)
    return ctx


def _identity(where: str, ctx: GnuTLSContext, profile: Profile) -> None:
    """Our certificate chain and key, and the facts' `local`."""
    assert profile.certificate is not None and profile.private_key is not None
    try:
        ctx.load_key_pair(profile.certificate, profile.private_key,
                          profile.private_key_password)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: certificate {profile.certificate} and key {profile.private_key} "
            f"cannot be used: {exc}"
        ) from None
    try:
        ctx.local_cert = cert_info_from_pem_file(profile.certificate)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: certificate {profile.certificate}: {exc}") from None


def _trust(where: str, ctx: GnuTLSContext, profile: Profile) -> None:
    steps = [("CA list", profile.ca_list, ctx.load_trust),
             ("CA path", profile.ca_path, ctx.load_trust_dir)]
    if profile.crl is not None:
        issuers = frozenset(c.issuer.public_bytes() for c in pem_crls(where, profile.crl))
        steps.append(("CRL", profile.crl, functools.partial(ctx.load_crl, issuers=issuers)))
    for what, path, load in steps:
        if path is None:
            continue
        try:
            load(path)
        except ValueError as exc:
            raise ConfigError(f"{where}: {what} {path} unusable: {exc}") from None


def listener_context(
    default: ServerProfile, sni_profiles: Sequence[ServerProfile], *, strict: bool
) -> GnuTLSContext:
    """The default profile's context, with the profiles sessions choose from by SNI (daemon/
    sni.py); with `strict`, a name none serves is refused with unrecognized_name."""
    base = server_context(default)
    base.sni = SniRouter(base, ((p.server_names, server_context(p)) for p in sni_profiles),
                         strict=strict)
    return base


def client_context(profile: ClientProfile, *, alpn: Sequence[str] = ()) -> GnuTLSContext:
    """A client context for `profile`, with the server-side helpers: priority (versions,
    ciphers, TLS 1.3 suites, groups), CA list / path and CRL (the server's own certificate is
    checked, and its issuer must have a CRL in `crl`). Neither `ca_list` nor `ca_path`: the
    system's CAs. Raises ConfigError naming the client profile."""
    where = f"client profile '{profile.name}'"
    need_lib()
    try:
        ctx = GnuTLSContext(
            server_side=False,
            priority=priority(where, profile),
            verify="on" if profile.verify_server else "off",
            alpn=alpn,
            verify_depth=profile.verify_depth,
            name=profile.name,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if profile.certificate is not None:
        _identity(where, ctx, profile)
    if profile.verify_server:
        if profile.ca_list is None and profile.ca_path is None:
            try:
                ctx.load_trust(None)
            except ValueError as exc:
                raise ConfigError(f"{where}: the system's CAs are unusable: {exc}") from None
        _trust(where, ctx, profile)
    return ctx

