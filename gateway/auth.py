"""Who is calling: an API key from the `authorization` metadata, resolved to a tenant and a tier.

Failures carry the gRPC status to answer with. Their messages and the logs name at most the
public key id, never the key.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from gateway import apikeys
from gateway.apikeys import MISSING_KEY_MESSAGE
from gateway.keystore import KeyStore
from gateway.metrics import AUTH_FAILURES

log = logging.getLogger(__name__)

ANONYMOUS_TENANT = "anonymous"


class AuthMode(enum.StrEnum):
    REQUIRED = "required"
    OFF = "off"  # development and tests: every caller is tenant "anonymous", tier "free"


@dataclass(frozen=True)
class Caller:
    tenant: str
    tier: str
    key_id: str = ""
    quarantined: bool = False


ANONYMOUS = Caller(tenant=ANONYMOUS_TENANT, tier="free")


class AuthFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason  # metric label: missing, malformed, unknown, revoked


class Authenticator:
    def __init__(self, keys: KeyStore, mode: AuthMode) -> None:
        self._keys = keys
        self.mode = mode

    async def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """Raises AuthFailed, or redis.exceptions.RedisError when the key store is unreachable."""
        if self.mode == AuthMode.OFF:
            return ANONYMOUS
        authorization = _authorization(metadata)
        if not authorization:
            raise _failed(grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY_MESSAGE, "missing")
        try:
            key = apikeys.bearer_key(authorization)
            key_id = apikeys.key_id_of(key)
        except apikeys.MalformedKey as exc:
            raise _failed(grpc.StatusCode.UNAUTHENTICATED, str(exc), "malformed") from None
        record = await self._keys.get(key_id)
        # An unknown id and a known id with the wrong secret look the same to the caller.
        if record is None or not record.matches(key):
            log.info("rejected an unknown API key (key id %s)", key_id)
            raise _failed(grpc.StatusCode.UNAUTHENTICATED, "unknown API key", "unknown")
        if record.revoked:
            raise _failed(grpc.StatusCode.PERMISSION_DENIED, f"API key {key_id} has been revoked", "revoked")
        return Caller(tenant=record.tenant, tier=record.tier, key_id=key_id, quarantined=record.quarantined)


def _authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            return value
    return ""


def _failed(code: grpc.StatusCode, message: str, reason: str) -> AuthFailed:
    AUTH_FAILURES.labels(reason=reason).inc()
    return AuthFailed(code, message, reason)
