"""Requests protobuf itself refuses (invalid UTF-8 from a raw client) and oversized metadata get
INVALID_ARGUMENT naming the field, never grpc's INTERNAL, and nothing is stored."""

from __future__ import annotations

import grpc
import pytest

from kvgate.v1 import chat_pb2, common_pb2
from tests.integration.fleet import Fleet


def _with_bad_byte(request: bytes, marker: bytes) -> bytes:
    # Same length, so every length prefix stays right: only the UTF-8 breaks.
    return request.replace(marker, b"\xff" + marker[1:])


async def test_invalid_utf8_is_invalid_argument_naming_the_field(fleet: Fleet) -> None:
    await fleet.start({"bytes-a": ("us-east", 2000)})
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        send = channel.unary_stream("/kvgate.v1.Chat/Send")  # raw bytes in and out
        stateless = chat_pb2.SendRequest(
            model="llama-3-8b",
            messages=[
                common_pb2.Message(role="user", content="fine"),
                common_pb2.Message(role="assistant", content="fine too"),
                common_pb2.Message(role="user", content="MARKER here"),
            ],
        ).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in send(_with_bad_byte(stateless, b"MARKER"), timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "messages[2].content is not valid UTF-8 (byte 0xff at offset 0)"

        create = channel.unary_unary("/kvgate.v1.Chat/CreateSession")
        request = chat_pb2.CreateSessionRequest(metadata={"team": "MARKER"}).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create(_with_bad_byte(request, b"MARKER"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "metadata[0].value is not valid UTF-8 (byte 0xff at offset 0)"

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create(b"\x0a\x05ab", timeout=10)  # a field that claims more bytes than there are
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid kvgate.v1.CreateSessionRequest message" in (info.value.details() or "")

    async with fleet.client() as client:
        assert await client.list_sessions() == []  # nothing was stored


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"k" * 129: "v"}, "metadata key is 129 bytes; the limit is 128"),
        ({"team": "v" * 2049}, "metadata['team'] is 2049 bytes; the limit is 2048"),
        ({"": "v"}, "metadata key must not be empty"),
        ({"team": "a\x00b"}, "metadata['team'] contains a control character (U+0000) at offset 1"),
        ({f"k{i}": "v" for i in range(33)}, "metadata has 33 entries; the limit is 32"),
    ],
)
async def test_metadata_entries_are_bounded(fleet: Fleet, metadata: dict[str, str], problem: str) -> None:
    await fleet.start_control_plane()
    async with fleet.client() as client:
        assert fleet.gateway is not None
        async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
            from kvgate.v1 import chat_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await chat_pb2_grpc.ChatStub(channel).CreateSession(
                    chat_pb2.CreateSessionRequest(metadata=metadata), timeout=10
                )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == problem
        assert await client.list_sessions() == []
