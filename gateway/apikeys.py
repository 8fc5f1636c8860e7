"""API keys: their format, how they are hashed, and the record each one maps to. No I/O.

A key reads `kvg_<key id>_<secret>`:

- `kvg_` makes a leaked key recognisable (secret scanners, log greps, a human).
- the key id (12 hex characters, 48 random bits) is public: `kvgate keys list` shows it,
  revoke and quarantine take it, and the gateway uses it to find the key's record.
- the secret is 32 random bytes (256 bits), base64url.

Only a SHA-256 of the whole key is stored. A slow password hash (bcrypt, argon2) exists to
make guessing low-entropy passwords expensive; a 256-bit random secret cannot be guessed
whatever the hash, so a fast hash costs nothing in safety and keeps authentication at one
Redis read plus a microsecond of CPU per request. No pepper for the same reason: it would
add a secret to distribute to every gateway without making the hash any harder to invert.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "kvg_"
KEY_ID_BYTES = 6
SECRET_BYTES = 32
TIERS = ("free", "plus", "enterprise")
MISSING_KEY_MESSAGE = "missing API key: send 'authorization: Bearer <key>'"

_KEY_RE = re.compile(r"^kvg_(?P<key_id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
# Tenant names end up inside Redis hash tags ({tenant}) and log lines: keep them plain.
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class MalformedKey(ValueError):
    """The string is not shaped like a kvgate API key (the message never repeats it)."""


@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str  # shown to the operator once, never stored


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    key_hash: str
    tenant: str
    tier: str
    label: str = ""
    created_ms: int = 0
    revoked: bool = False
    quarantined: bool = False

    def matches(self, key: str) -> bool:
        # Constant-time: the comparison must not leak how much of a guessed hash matched.
        return hmac.compare_digest(self.key_hash, hash_key(key))

    def to_redis(self) -> dict[str, str | int]:
        return {
            "hash": self.key_hash,
            "tenant": self.tenant,
            "tier": self.tier,
            "label": self.label,
            "created_ms": self.created_ms,
            "revoked": int(self.revoked),
            "quarantined": int(self.quarantined),
        }

    @classmethod
    def from_redis(cls, key_id: str, fields: dict[str, str]) -> KeyRecord:
        return cls(
            key_id=key_id,
            key_hash=fields["hash"],
            tenant=fields["tenant"],
            tier=fields["tier"],
            label=fields.get("label", ""),
            created_ms=int(fields.get("created_ms", "0")),
            revoked=fields.get("revoked") == "1",
            quarantined=fields.get("quarantined") == "1",
        )


def generate() -> NewKey:
    key_id = secrets.token_hex(KEY_ID_BYTES)
    return NewKey(key_id=key_id, key=f"{PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key: str) -> str:
    """The public key id inside a key; raises MalformedKey if the string is not a key."""
    match = _KEY_RE.match(key)
    if match is None:
        raise MalformedKey(f"malformed API key: expected '{PREFIX}<id>_<secret>'")
    return match["key_id"]


def bearer_key(authorization: str) -> str:
    """The key inside an `authorization` metadata value ("Bearer <key>", scheme case-insensitive)."""
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise MalformedKey(MISSING_KEY_MESSAGE)
    return key.strip()


def check_tenant(tenant: str) -> str:
    """An error naming the problem, or "" when the tenant name is usable."""
    if not _TENANT_RE.match(tenant):
        return f"tenant {tenant!r} must be 1-64 of letters, digits, '.', '_' or '-', starting alphanumeric"
    return ""


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        return f"tier {tier!r} must be one of {', '.join(TIERS)}"
    return ""
