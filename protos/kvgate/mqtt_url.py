"""The broker URL shared by the worker and the scheduler: mqtt://[user[:password]@]host[:port]."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt


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

    def client(self, identifier: str, keepalive_s: int, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            hostname=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            keepalive=keepalive_s,
            will=will,
        )


class Backoff:
    """Capped exponential delay between reconnect attempts; reset once connected."""

    def __init__(self, first_s: float = 0.5, cap_s: float = 10.0) -> None:
        self._first_s = first_s
        self._cap_s = cap_s
        self.delay_s = first_s

    def reset(self) -> None:
        self.delay_s = self._first_s

    def next(self) -> float:
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self._cap_s)
        return delay
