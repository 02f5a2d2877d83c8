"""TLS probe: TCP connect plus handshake timing, and the peer certificate's expiry.

The certificate is read in binary form and parsed with ``cryptography`` so that expiry,
subject and issuer are reported even with ``verify=False`` (``getpeercert()`` returns
an empty dict for unverified peers), which is how an operator watches a self-signed or
soon-to-expire certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from typing import Any

from cryptography import x509

from probes import ProbeResult
from probes._util import (
    classify,
    connect,
    failure,
    host_label,
    literal_address,
    resolve,
    success,
)


def _context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _session_details(ssl_object: ssl.SSLObject | None) -> dict[str, Any]:
    if ssl_object is None:
        return {}
    cipher = ssl_object.cipher()
    details: dict[str, Any] = {
        "version": ssl_object.version(),
        "cipher": cipher[0] if cipher else None,
    }
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        cert = x509.load_der_x509_certificate(der)
        left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        details.update(
            days_to_expiry=left.total_seconds() / 86400.0,
            not_after=cert.not_valid_after_utc.isoformat(),
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
        )
    return details


class TlsProbe:
    """Connect to ``host:port`` and complete a TLS handshake (verified unless ``verify=False``)."""

    type = "tls"

    def __init__(
        self,
        host: str,
        port: int = 443,
        server_name: str | None = None,
        verify: bool = True,
        ca_file: str | None = None,
    ) -> None:
        if not host:
            raise ValueError("tls probe needs a host")
        if not 0 < port < 65536:
            raise ValueError(f"tls port {port} out of range 1-65535")
        self.host = host
        self.port = port
        self.server_name = server_name
        self.verify = verify
        self.ca_file = ca_file
        self._label = host_label(host, port)
        self._address = literal_address(host, port)
        # Also the name checked against the certificate; an IP literal is matched against
        # the IP SANs and, per RFC 6066, not sent as SNI.
        self._sni = server_name or host.strip("[]")
        # Built once: loading a CA bundle costs milliseconds.
        self._context = _context(verify, ca_file)

    @property
    def target(self) -> str:
        return self._label

    async def run(self, timeout: float) -> ProbeResult:
        loop = asyncio.get_running_loop()
        phases = {"resolve": 0.0, "connect": 0.0, "tls": 0.0}
        try:
            async with asyncio.timeout(timeout):
                address = self._address
                if address is None:
                    started = time.perf_counter()
                    address = await resolve(self.host, self.port)
                    phases["resolve"] = time.perf_counter() - started
                started = time.perf_counter()
                sock = await connect(address)
                connected = time.perf_counter()
                phases["connect"] = connected - started
                try:
                    transport, _ = await loop.create_connection(
                        asyncio.Protocol, sock=sock, ssl=self._context, server_hostname=self._sni
                    )
                except BaseException:
                    sock.close()
                    raise
                phases["tls"] = time.perf_counter() - connected
                try:
                    details = _session_details(transport.get_extra_info("ssl_object"))
                finally:
                    # abort(), not close(): no close_notify exchange to wait for.
                    transport.abort()
        except Exception as exc:  # every failure is a result, never an exception
            error, message = classify(exc)
            return failure(self.type, self._label, error, message, phases=phases)
        latency = phases["connect"] + phases["tls"]
        return success(self.type, self._label, latency, phases=phases, details=details)
