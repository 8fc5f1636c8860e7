"""`kvgate gateway`: run one gateway replica."""

from __future__ import annotations

import argparse
import os
import sys

from gateway.admission import AdmissionPolicy
from gateway.auth import AuthMode
from gateway.buckets import DEFAULT_LIMITS, TierLimits, parse_limits
from gateway.openai_http import split_listen
from gateway.relay import DEFAULT_COALESCE_MS
from gateway.server import GatewayService, GatewaySettings
from gateway.validation import Limits
from kvgate.service import run_event_loop, run_until_signalled
from kvgate.tls import TlsFiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", default="0.0.0.0:50050", help="gRPC listen address (default: %(default)s)"
    )
    parser.add_argument(
        "--scheduler",
        default="localhost:50051",
        help="scheduler address host:port, or dns:///name:port for every replica behind one DNS "
        "name, balanced round-robin (default: %(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVGATE_REDIS_URL", "redis://localhost:6379/0"),
        help="Redis holding session histories, redis://[:password@]host:port/db "
        "(default: $KVGATE_REDIS_URL or redis://localhost:6379/0)",
    )
    parser.add_argument(
        "--models",
        default="llama-3-8b",
        help="comma-separated models the fleet serves; the first is the default",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=7 * 24 * 3600.0,
        help="seconds an idle session is kept (default: 7 days)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=32 * 1024,
        help="largest user message accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--max-conversation-bytes",
        type=int,
        default=Limits.max_conversation_bytes,
        help="largest stateless conversation accepted (the messages' content, summed; the HTTP API's"
        " request bodies are capped accordingly) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=4096,
        help="largest max_tokens a client may ask for (default: %(default)s)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="max_tokens when the client sends none (default: %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds in-flight turns get to finish on SIGTERM (default: %(default)s)",
    )
    parser.add_argument(
        "--http-listen",
        default=None,
        metavar="HOST:PORT",
        help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) here,"
        " e.g. 0.0.0.0:8080 (default: off)",
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: off)")
    parser.add_argument("--tls-cert", default="", help="PEM server certificate: serve gRPC and HTTP over TLS")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", default="", help="PEM CA: require client certificates signed by it (mutual TLS)"
    )
    parser.add_argument(
        "--coalesce-ms",
        type=float,
        default=DEFAULT_COALESCE_MS,
        help="merge worker chunks arriving within this window into one client message; the first "
        "token is never delayed; 0 relays every chunk (default: %(default)s)",
    )
    parser.add_argument(
        "--admission-wait-ms",
        type=float,
        default=0.0,
        help="when the fleet is full, hold a turn up to this long for capacity before shedding it"
        " (RESOURCE_EXHAUSTED); 0 sheds at once (default: %(default)s)",
    )
    parser.add_argument(
        "--admission-max-waiting",
        type=int,
        default=AdmissionPolicy.max_waiting,
        help="at most this many turns wait for capacity at once; more are shed at once"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--auth",
        choices=[m.value for m in AuthMode],
        default=AuthMode.REQUIRED.value,
        help="'required': every call needs 'authorization: Bearer <key>' (keys from `kvgate keys create`);"
        " 'off': no keys, every caller is tenant 'anonymous' on the free tier (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-limit",
        choices=["on", "off"],
        default="on",
        help="per-tenant request and token rate limits (default: %(default)s)",
    )
    for tier, limits in DEFAULT_LIMITS.items():
        parser.add_argument(
            f"--limits-{tier}",
            default="",
            metavar="rps=N,burst=N,tpm=N",
            help=f"{tier} tier limits: requests per second, request burst, tokens per minute"
            f" (any subset; default: rps={_num(limits.requests_per_s)},burst={_num(limits.request_burst)},"
            f"tpm={_num(limits.tokens_per_min)})",
        )


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def run(args: argparse.Namespace) -> int:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models:
        print("kvgate gateway: --models must name at least one model", file=sys.stderr)
        return 2
    if args.max_conversation_bytes < 1:
        print("kvgate gateway: --max-conversation-bytes must be positive", file=sys.stderr)
        return 2
    if args.http_listen is not None:
        try:
            split_listen(args.http_listen)
        except ValueError as exc:
            print(f"kvgate gateway: --http-listen: {exc}", file=sys.stderr)
            return 2
    rate_limits: dict[str, TierLimits] = {}
    for tier, base in DEFAULT_LIMITS.items():
        try:
            rate_limits[tier] = parse_limits(getattr(args, f"limits_{tier}"), base)
        except ValueError as exc:
            print(f"kvgate gateway: --limits-{tier}: {exc}", file=sys.stderr)
            return 2
    try:
        tls = TlsFiles.from_args(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValueError as exc:
        print(f"kvgate gateway: {exc}", file=sys.stderr)
        return 2
    try:
        admission = AdmissionPolicy(args.admission_wait_ms / 1000, args.admission_max_waiting)
    except ValueError as exc:
        print(f"kvgate gateway: --admission-wait-ms / --admission-max-waiting: {exc}", file=sys.stderr)
        return 2
    settings = GatewaySettings(
        listen=args.listen,
        scheduler=args.scheduler,
        redis_url=args.redis_url,
        models=models,
        session_idle_ttl_s=args.session_ttl,
        limits=Limits(
            max_message_bytes=args.max_message_bytes,
            max_conversation_bytes=args.max_conversation_bytes,
            max_tokens_limit=args.max_tokens_limit,
            default_max_tokens=args.default_max_tokens,
        ),
        metrics_port=args.metrics_port,
        grace_s=args.grace,
        auth=AuthMode(args.auth),
        rate_limits=rate_limits if args.rate_limit == "on" else None,
        coalesce_ms=args.coalesce_ms,
        http_listen=args.http_listen,
        tls=tls,
        admission=admission,
    )

    async def main() -> None:
        service = GatewayService(settings)
        await run_until_signalled("gateway", service.start, service.stop)

    run_event_loop(main())
    return 0
