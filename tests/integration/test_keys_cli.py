"""`kvgate keys` against real Redis: the key is printed once, lists never show it."""

from __future__ import annotations

import json
import subprocess
import sys

from gateway import apikeys


def kvgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "keys", *args], capture_output=True, text=True, timeout=60
    )


def test_create_list_quarantine_revoke(clean_redis: str) -> None:
    created = kvgate(
        "create", "--tenant", "acme", "--tier", "plus", "--label", "ci", "--redis-url", clean_redis
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = apikeys.key_id_of(key)
    assert key_id in created.stderr and key not in created.stderr

    kvgate("create", "--tenant", "other", "--tier", "free", "--redis-url", clean_redis)
    listed = kvgate("list", "--tenant", "acme", "--json", "--redis-url", clean_redis)
    assert listed.returncode == 0 and key not in listed.stdout
    (record,) = json.loads(listed.stdout)
    assert record["key_id"] == key_id and record["tier"] == "plus" and record["label"] == "ci"
    assert not record["revoked"] and not record["quarantined"] and record["created_unix_ms"] > 0

    assert kvgate("quarantine", key_id, "--redis-url", clean_redis).returncode == 0
    assert kvgate("revoke", key_id, "--redis-url", clean_redis).returncode == 0
    table = kvgate("list", "--redis-url", clean_redis)
    assert table.returncode == 0 and key not in table.stdout
    (row,) = [line for line in table.stdout.splitlines() if key_id in line]
    assert "acme" in row and "revoked" in row
    assert len(table.stdout.strip().splitlines()) == 3  # header + two keys

    missing = kvgate("revoke", "0123456789ab", "--redis-url", clean_redis)
    assert missing.returncode == 1 and "no key with id" in missing.stderr
    bad = kvgate("create", "--tenant", "a{b}", "--tier", "free", "--redis-url", clean_redis)
    assert bad.returncode == 2 and "tenant" in bad.stderr and "Traceback" not in bad.stderr
    down = kvgate("list", "--redis-url", "redis://127.0.0.1:1/0")
    assert down.returncode == 1 and "cannot use Redis" in down.stderr and "Traceback" not in down.stderr
