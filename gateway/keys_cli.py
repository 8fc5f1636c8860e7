"""`kvgate keys ...`: create, list, revoke and quarantine the gateway's API keys (in Redis)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable

import redis.exceptions

from gateway.apikeys import PREFIX, TIERS, KeyRecord
from gateway.keystore import KeyStore
from kvgate.redis_conn import connect_redis

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    create = _action(sub, "create", "create a key and print it (once: only its hash is stored)", _create)
    create.add_argument("--tenant", required=True, help="tenant the key acts for (owns its sessions)")
    create.add_argument(
        "--tier", required=True, choices=TIERS, help="service tier: rate limits and placement priority"
    )
    create.add_argument("--label", default="", help="a note shown by `keys list` (e.g. who holds it)")

    revoke = _action(sub, "revoke", "revoke a key for good (calls get PERMISSION_DENIED)", _revoke)
    revoke.add_argument("key_id", help="the key's public id, as shown by `kvgate keys list`")

    listing = _action(sub, "list", "list keys (ids, tenants, tiers, state; never the keys)", _list)
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    quarantine = _action(
        sub, "quarantine", "quarantine a key: its turns get canned meows, never a GPU", _quarantine
    )
    quarantine.add_argument("key_id", help="the key's public id, as shown by `kvgate keys list`")
    quarantine.add_argument("--off", action="store_true", help="lift the quarantine instead")


def _action(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    command: Callable[[KeyStore, argparse.Namespace], Awaitable[int]],
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVGATE_REDIS_URL", DEFAULT_REDIS_URL),
        help="the gateway's Redis (default: $KVGATE_REDIS_URL or %(default)s)",
    )
    parser.set_defaults(run=lambda args: _run(command, args))
    return parser


def _run(command: Callable[[KeyStore, argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    async def main() -> int:
        client = connect_redis(args.redis_url)
        try:
            return await command(KeyStore(client), args)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except redis.exceptions.RedisError as exc:
        print(f"kvgate keys: cannot use Redis at {args.redis_url} ({exc})", file=sys.stderr)
        return 1


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    try:
        new = await store.create(args.tenant, args.tier, args.label)
    except ValueError as exc:
        print(f"kvgate keys create: {exc}", file=sys.stderr)
        return 2
    # The key alone on stdout, so scripts can capture it: KEY=$(kvgate keys create ...).
    print(new.key)
    print(
        f"created key {new.key_id} for tenant {args.tenant} ({args.tier}); "
        "store it now, it cannot be shown again",
        file=sys.stderr,
    )
    return 0


async def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    if not await store.revoke(args.key_id):
        return _no_such_key(args.key_id)
    print(f"revoked key {args.key_id}", file=sys.stderr)
    return 0


async def _quarantine(store: KeyStore, args: argparse.Namespace) -> int:
    if not await store.quarantine(args.key_id, not args.off):
        return _no_such_key(args.key_id)
    print(f"key {args.key_id} {'released from' if args.off else 'put in'} quarantine", file=sys.stderr)
    return 0


async def _list(store: KeyStore, args: argparse.Namespace) -> int:
    records = await store.list(args.tenant)
    if args.json:
        print(json.dumps([_public(r) for r in records], indent=2))
        return 0
    rows = [("KEY", "TENANT", "TIER", "STATE", "CREATED (UTC)", "LABEL")]
    rows += [
        (f"{PREFIX}{r.key_id}_…", r.tenant, r.tier, _state(r), _utc(r.created_ms), r.label) for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _public(record: KeyRecord) -> dict[str, object]:
    """What `list --json` shows: everything but the hash (of no use to anyone reading it)."""
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "tier": record.tier,
        "label": record.label,
        "created_unix_ms": record.created_ms,
        "revoked": record.revoked,
        "quarantined": record.quarantined,
    }


def _state(record: KeyRecord) -> str:
    if record.revoked:
        return "revoked"
    return "quarantined" if record.quarantined else "active"


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def _no_such_key(key_id: str) -> int:
    print(f"kvgate keys: no key with id {key_id!r} (see `kvgate keys list`)", file=sys.stderr)
    return 1
