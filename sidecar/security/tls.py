"""TLS for the listener: TLS 1.2+, modern ciphers, optional client certificates, and a
certificate that can be replaced without a restart."""

from __future__ import annotations

import logging
import ssl

from sidecar.settings import ServerSettings

log = logging.getLogger("sidecar.tls")

# TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are OpenSSL's defaults.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES"


def server_context(settings: ServerSettings) -> ssl.SSLContext:
    """Reads the certificate files: call it at start-up, not from the event loop."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.tls_client_ca)
    return context


def reload_certificate(context: ssl.SSLContext, settings: ServerSettings) -> bool:
    """Load the certificate files again into the live context: new handshakes use the new
    certificate, connections already open keep theirs. A bad pair leaves the old one in place.

    This runs on the event loop on purpose (SIGHUP, rare): OpenSSL does not promise that a
    context can change under a handshake running in another thread. Two small local files are
    read, and the pair is checked in a scratch context first.
    """
    try:
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        scratch.load_cert_chain(settings.tls_cert, settings.tls_key)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.load_verify_locations(settings.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        log.error("certificate reload failed; keeping the current one",
                  extra={"fields": {"error": str(exc)}})
        return False
    log.info("certificate reloaded", extra={"fields": {"cert": settings.tls_cert}})
    return True
