from __future__ import annotations

import pytest

from gateway.validation import Limits, check_max_tokens, check_text
from kvgate import topics
from kvgate.mqtt_url import Backoff, MqttUrl


def test_mqtt_url_parses_credentials_and_redacts_them() -> None:
    url = MqttUrl.parse("mqtt://worker-1:s%40cret@broker:1884")
    assert (url.host, url.port, url.username, url.password) == ("broker", 1884, "worker-1", "s@cret")
    assert "s@cret" not in url.redacted()
    assert MqttUrl.parse("mqtt://localhost").port == 1883


@pytest.mark.parametrize("bad", ["http://broker", "mqtt://", "mqtt://host:notaport"])
def test_bad_mqtt_urls_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="--mqtt-url"):
        MqttUrl.parse(bad)


def test_topics_round_trip_and_reject_foreign_topics() -> None:
    assert topics.parse(topics.topic("us-1", topics.STATS)) == ("us-1", "stats")
    assert topics.parse("kvgate/v1/workers/us-1/other") is None
    assert topics.parse("elsewhere/us-1/stats") is None


def test_text_checks_name_the_field() -> None:
    assert check_text("content", "hi", 10) == ""
    assert check_text("content", " \n", 10) == "content must not be empty"
    assert check_text("content", "x" * 11, 10) == "content is 11 bytes; the limit is 10"
    assert "control character (U+0007)" in check_text("content", "bell\x07", 100)
    assert "not valid UTF-8" in check_text("content", "bad\udc80", 100)
    assert check_max_tokens(5000, Limits()) == "max_tokens is 5000; the limit is 4096"


def test_reconnect_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(first_s=0.5, cap_s=3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5
