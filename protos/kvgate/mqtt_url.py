"""Parse the broker URL shared by the worker and the scheduler: mqtt://[user[:password]@]host[:port]."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> MqttUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp"):
            raise ValueError(f"--mqtt-url {url!r}: scheme must be mqtt://, got {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise ValueError(f"--mqtt-url {url!r}: no host")
        try:
            port = parts.port or 1883
        except ValueError as exc:
            raise ValueError(f"--mqtt-url {url!r}: bad port") from exc
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def redacted(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"mqtt://{user}{self.host}:{self.port}"
