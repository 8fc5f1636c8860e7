"""TLS material for a public listener: a server certificate, optionally a client CA (mTLS)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    # When set, clients must present a certificate signed by this CA (mutual TLS).
    client_ca: Path | None = None

    @classmethod
    def from_args(cls, cert: str, key: str, client_ca: str) -> TlsFiles | None:
        if not cert and not key:
            if client_ca:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (cert and key):
            raise ValueError("--tls-cert and --tls-key go together")
        files = cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
        for flag, path in (
            ("--tls-cert", files.cert),
            ("--tls-key", files.key),
            ("--tls-client-ca", files.client_ca),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {str(path)!r}: no such file")
        return files

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context
