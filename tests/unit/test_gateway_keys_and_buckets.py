"""API key format and hashing, token-bucket arithmetic, tier limit flags, the meow generator."""

from __future__ import annotations

import argparse
import hashlib
import random
import re

import pytest

from gateway import apikeys, keys_cli
from gateway.apikeys import KeyRecord, MalformedKey
from gateway.buckets import DEFAULT_LIMITS, Bucket, Level, TierLimits, level_now, parse_limits, take
from gateway.quarantine import fake_worker, meows


def test_generated_keys_are_prefixed_unique_and_carry_their_public_id() -> None:
    first, second = apikeys.generate(), apikeys.generate()
    assert first.key != second.key and first.key_id != second.key_id
    assert first.key.startswith(f"kvg_{first.key_id}_")
    assert apikeys.key_id_of(first.key) == first.key_id
    secret = first.key.removeprefix(f"kvg_{first.key_id}_")
    assert len(secret) == 43  # 32 random bytes, base64url without padding


def test_hash_is_sha256_of_the_whole_key_and_never_the_key() -> None:
    new = apikeys.generate()
    digest = apikeys.hash_key(new.key)
    assert digest == hashlib.sha256(new.key.encode()).hexdigest()
    record = KeyRecord(key_id=new.key_id, key_hash=digest, tenant="acme", tier="plus")
    assert record.matches(new.key)
    assert not record.matches(new.key[:-1] + ("A" if new.key[-1] != "A" else "B"))
    stored = record.to_redis()
    assert new.key not in str(stored)
    assert KeyRecord.from_redis(new.key_id, {k: str(v) for k, v in stored.items()}) == record


@pytest.mark.parametrize(
    "bad",
    ["", "kvg-abc", "sk-abc", "kvg_0123456789ab", "kvg_0123456789ab_short", "kvg_XYZ456789abc_" + "a" * 43],
)
def test_malformed_keys_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(MalformedKey) as info:
        apikeys.key_id_of(bad)
    assert "malformed API key" in str(info.value)
    assert not bad or bad not in str(info.value)


def test_bearer_header_parsing() -> None:
    assert apikeys.bearer_key("Bearer kvg_x") == "kvg_x"
    assert apikeys.bearer_key("bearer   kvg_x ") == "kvg_x"
    for bad in ("", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "kvg_x"):
        with pytest.raises(MalformedKey, match="missing API key: send 'authorization: Bearer <key>'"):
            apikeys.bearer_key(bad)


def test_tenant_and_tier_checks() -> None:
    assert apikeys.check_tenant("acme-corp.eu_1") == ""
    for bad in ("", "-acme", "a{b}", "a b", "x" * 65):
        assert "tenant" in apikeys.check_tenant(bad)
    assert apikeys.check_tier("enterprise") == ""
    assert "free, plus, enterprise" in apikeys.check_tier("gold")


BUCKET = Bucket(capacity=10, per_ms=0.01)  # 10 tokens, refills 10 per second


def test_a_new_bucket_is_full_and_refills_up_to_its_capacity() -> None:
    assert level_now(BUCKET, None, 1_000) == 10
    assert level_now(BUCKET, Level(2, 1_000), 1_300) == pytest.approx(5)
    assert level_now(BUCKET, Level(2, 1_000), 99_000) == 10
    assert BUCKET.refill_ms == 1000


def test_take_spends_then_refuses_with_the_wait_until_enough_refills() -> None:
    verdict, (level,) = take([(BUCKET, None, 7)], now_ms=0)
    assert verdict.allowed and level == Level(3, 0)
    verdict, (same,) = take([(BUCKET, level, 5)], now_ms=100)  # 3 + 1 refilled = 4 < 5
    assert not verdict.allowed and same == level
    assert verdict.retry_after_ms == 100 and verdict.limited_by == 0
    verdict, _ = take([(BUCKET, level, 5)], now_ms=200)  # exactly the promised wait later
    assert verdict.allowed


def test_take_charges_all_buckets_or_none_and_reports_the_longest_wait() -> None:
    requests = Bucket(capacity=5, per_ms=0.002)
    tokens = Bucket(capacity=1000, per_ms=1000 / 60_000)
    verdict, levels = take([(requests, None, 1), (tokens, Level(100, 0), 400)], now_ms=0)
    assert not verdict.allowed and verdict.limited_by == 1
    assert verdict.retry_after_ms == 18_000  # 300 tokens at 1000/min
    assert levels == [None, Level(100, 0)]  # the request bucket was not charged either


def test_a_cost_above_capacity_waits_for_a_full_bucket_instead_of_never() -> None:
    verdict, (level,) = take([(BUCKET, Level(0, 0), 50)], now_ms=0)
    assert not verdict.allowed and verdict.retry_after_ms == 1000
    verdict, (level,) = take([(BUCKET, Level(0, 0), 50)], now_ms=1000)
    assert verdict.allowed and level == Level(0, 1000)


def test_tier_limits_become_buckets() -> None:
    limits = TierLimits(requests_per_s=2, request_burst=10, tokens_per_min=60_000)
    assert limits.requests() == Bucket(capacity=10, per_ms=0.002)
    assert limits.tokens() == Bucket(capacity=60_000, per_ms=1.0)
    free, plus, enterprise = (DEFAULT_LIMITS[t] for t in apikeys.TIERS)
    assert free.tokens_per_min < plus.tokens_per_min < enterprise.tokens_per_min


def test_limit_flags_override_any_subset() -> None:
    base = DEFAULT_LIMITS["free"]
    assert parse_limits("", base) == base
    assert parse_limits("tpm=500, rps=0.5", base) == TierLimits(0.5, base.request_burst, 500)
    with pytest.raises(ValueError, match="unknown limit 'rpm'"):
        parse_limits("rpm=3", base)
    with pytest.raises(ValueError, match="must be positive"):
        parse_limits("burst=0", base)
    with pytest.raises(ValueError, match="must be a number"):
        parse_limits("tpm=lots", base)


def test_meows_are_all_meow_and_exactly_the_token_count() -> None:
    rng = random.Random(7)
    for count in (1, 2, 5, 40):
        tokens = meows(count, rng)
        assert len(tokens) == count
        text = "".join(tokens)
        assert re.fullmatch(r"Meow[.!?…]?( [Mm]eow[.!?…]?)*", text), text
        assert text[-1] in ".!?…"


def test_a_made_up_worker_is_the_same_for_the_same_key() -> None:
    assert fake_worker(b"s1") == fake_worker(b"s1")
    worker_id, region = fake_worker(b"s1")
    assert worker_id.startswith(region.split("-")[0] + "-")


def test_every_keys_action_explains_every_option() -> None:
    parser = argparse.ArgumentParser()
    keys_cli.add_arguments(parser)
    (actions,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(actions.choices) == {"create", "revoke", "list", "quarantine"}
    for name, child in actions.choices.items():
        for action in child._actions:
            if action.dest != "help":
                assert action.help, f"keys {name} {action.option_strings or action.dest} has no help text"


def test_a_refund_fills_the_bucket_but_never_past_its_capacity() -> None:
    verdict, (level,) = take([(BUCKET, Level(2, 0), -5)], now_ms=0)
    assert verdict.allowed and level == Level(7, 0)
    verdict, (level,) = take([(BUCKET, Level(8, 0), -5)], now_ms=0)
    assert verdict.allowed and level == Level(BUCKET.capacity, 0)
    # A refund of more than a charge can take gives back at most the capacity.
    verdict, (level,) = take([(BUCKET, Level(0, 0), -1000)], now_ms=0)
    assert level == Level(BUCKET.capacity, 0)
