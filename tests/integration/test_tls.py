"""The gateway's public ports over TLS (and mutual TLS), for gRPC and the OpenAI HTTP API."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kvgate.tls import TlsFiles
from tests.integration.fleet import Fleet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["bash", str(REPO / "deploy" / "make-tls-cert.sh"), str(out)], check=True, capture_output=True
    )
    return out


async def test_grpc_and_openai_clients_over_tls(fleet: Fleet, certs: Path) -> None:
    tls = TlsFiles(certs / "server.crt", certs / "server.key")
    await fleet.start({"us-1": ("us-east", 2000)}, http=True, gateway_overrides={"tls": tls})
    assert fleet.gateway is not None
    address = fleet.gateway.address.replace("127.0.0.1", "localhost")

    from gateway.client import ChatClient

    async with ChatClient(address, tls_ca=str(certs / "ca.crt")) as client:
        session = await client.create_session()
        text, done, placement = await client.reply(session.session_id, "hello over TLS", max_tokens=6)
        assert text and done.usage.completion_tokens == 6 and placement.worker_id == "us-1"

    async with ChatClient(fleet.gateway.address) as plaintext:  # a client that does not speak TLS
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plaintext.create_session(timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    assert fleet.gateway.http is not None
    base = f"https://localhost:{fleet.gateway.http.address.rsplit(':', 1)[1]}/v1"
    # openai's own HTTP client class, whatever library it wraps, verifying with our CA.
    verify = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    async with openai.DefaultAsyncHttpxClient(verify=verify) as http_client:
        oai = openai.AsyncOpenAI(base_url=base, api_key="unused", http_client=http_client, max_retries=0)
        reply = await oai.chat.completions.create(
            model="llama-3-8b", messages=[{"role": "user", "content": "hi over https"}], max_tokens=5
        )
        assert reply.choices[0].message.content and reply.usage is not None
        assert reply.usage.completion_tokens == 5


async def test_mutual_tls_requires_a_client_certificate(fleet: Fleet, certs: Path) -> None:
    tls = TlsFiles(certs / "server.crt", certs / "server.key", client_ca=certs / "ca.crt")
    await fleet.start({"us-1": ("us-east", 2000)}, http=True, gateway_overrides={"tls": tls})
    assert fleet.gateway is not None
    address = fleet.gateway.address.replace("127.0.0.1", "localhost")

    from gateway.client import ChatClient

    async with ChatClient(address, tls_ca=str(certs / "ca.crt")) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await anonymous.create_session(timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    client_cert = (str(certs / "client.crt"), str(certs / "client.key"))
    async with ChatClient(address, tls_ca=str(certs / "ca.crt"), client_cert=client_cert) as client:
        session = await client.create_session()
        _, done, _ = await client.reply(session.session_id, "hello over mTLS", max_tokens=4)
        assert done.usage.completion_tokens == 4

    # The HTTP API asks for the same client certificates.
    assert fleet.gateway.http is not None
    base = f"https://localhost:{fleet.gateway.http.address.rsplit(':', 1)[1]}/v1"
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi over mutual TLS"}]
    anonymous_tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    async with openai.DefaultAsyncHttpxClient(verify=anonymous_tls) as http_client:
        oai = openai.AsyncOpenAI(base_url=base, api_key="unused", http_client=http_client, max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            await oai.chat.completions.create(model="llama-3-8b", messages=hello, max_tokens=3)
    with_cert = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with_cert.load_cert_chain(*client_cert)
    async with openai.DefaultAsyncHttpxClient(verify=with_cert) as http_client:
        oai = openai.AsyncOpenAI(base_url=base, api_key="unused", http_client=http_client, max_retries=0)
        reply = await oai.chat.completions.create(model="llama-3-8b", messages=hello, max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
