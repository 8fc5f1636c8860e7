"""Register a gRPC servicer so that requests protobuf cannot parse get INVALID_ARGUMENT naming the field.

protobuf refuses a proto3 string field holding invalid UTF-8, and grpc answers a request its
deserializer refused with INTERNAL ("Exception deserializing request") before our code runs:
a client bug would look like a server bug. Here the deserializer hands such a request on as
`Undecodable`, the method answers INVALID_ARGUMENT, and the message says which field and
which byte were wrong (found by walking the wire format against the message's descriptor).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH, _WIRE_FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Undecodable:
    problem: str


def add_servicer(service: ServiceDescriptor, servicer: object, server: grpc.aio.Server) -> None:
    """Like the generated add_<Service>Servicer_to_server, for unary-unary and unary-stream methods."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{service.full_name}.{method.name}: client streaming is not supported here")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        deserialize = _lenient_deserializer(request_class)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(behaviour),
                request_deserializer=deserialize,
                response_serializer=response_class.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour),
                request_deserializer=deserialize,
                response_serializer=response_class.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _lenient_deserializer(request_class: type[message.Message]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return request_class.FromString(data)
        except message.DecodeError as exc:
            problem = invalid_utf8(data, _descriptor(request_class)) or (
                f"the request is not a valid {request_class.DESCRIPTOR.full_name} message ({exc})"
            )
            return Undecodable(problem)

    return deserialize


def _unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        return await behaviour(request, context)

    return handle


def _streaming(
    behaviour: Callable[..., AsyncGenerator[Any, None]],
) -> Callable[..., AsyncGenerator[Any, None]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncGenerator[Any, None]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        # aclosing: closing the handler's stream closes the servicer's at once (its finally blocks
        # end the turn), not whenever the inner generator is garbage collected.
        async with contextlib.aclosing(behaviour(request, context)) as responses:
            async for response in responses:
                yield response

    return handle


def invalid_utf8(data: bytes, descriptor: Descriptor, path: str = "") -> str:
    """Which string field of the serialized `descriptor` message holds invalid UTF-8, or "".

    Fields are named as clients write them: `messages[1].content`, `metadata[0].key`.
    """
    counts: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == _WIRE_VARINT:
                _, pos = _varint(data, pos)
            elif wire == _WIRE_FIXED64:
                pos += 8
            elif wire == _WIRE_FIXED32:
                pos += 4
            elif wire == _WIRE_LENGTH:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = path + field.name
                if field.is_repeated:
                    index = counts.get(number, 0)
                    counts[number] = index + 1
                    name = f"{name}[{index}]"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        return (
                            f"{name} is not valid UTF-8 (byte 0x{chunk[exc.start]:02x} at offset {exc.start})"
                        )
                elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                    problem = invalid_utf8(chunk, field.message_type, name + ".")
                    if problem:
                        return problem
            else:
                return ""  # not a wire type we can walk: leave it to protobuf's own message
    except IndexError:
        return ""
    return ""


def _descriptor(message_class: type[message.Message]) -> Descriptor:
    descriptor = message_class.DESCRIPTOR
    assert isinstance(descriptor, Descriptor)
    return descriptor


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
