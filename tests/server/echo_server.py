"""An in-process grpc.aio server with a small echo service and the health service, to test
interceptors on real calls of every shape (unary, response stream, request-and-response stream)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fineserve.server.malformed import UnparsableRequest

SERVICE = "test.Echo"
UNARY = f"/{SERVICE}/Unary"
RESPONSE_STREAM = f"/{SERVICE}/ResponseStream"
STREAM = f"/{SERVICE}/Stream"
IN_BAND_STREAM = f"/{SERVICE}/InBandStream"
# A string field holding invalid UTF-8: not a valid HealthCheckRequest.
MALFORMED = b"\x0a\x02\xff\xfe"
Echo = health_pb2.HealthCheckRequest  # one string field, ``service``


def echoed(request: Any) -> Any:
    if isinstance(request, UnparsableRequest):
        return Echo(service=f"unparsable: {request.message}")
    return Echo(service=request.service)


async def unary(request: Any, context: Any) -> Any:
    return echoed(request)


async def response_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    for _ in range(2):
        yield echoed(request)


async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield echoed(request)


def _handlers() -> grpc.GenericRpcHandler:
    kinds = {
        "Unary": grpc.unary_unary_rpc_method_handler,
        "ResponseStream": grpc.unary_stream_rpc_method_handler,
        "Stream": grpc.stream_stream_rpc_method_handler,
        "InBandStream": grpc.stream_stream_rpc_method_handler,
    }
    behaviours = {"Unary": unary, "ResponseStream": response_stream, "Stream": stream, "InBandStream": stream}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: kind(
                behaviours[name],
                request_deserializer=Echo.FromString,
                response_serializer=Echo.SerializeToString,
            )
            for name, kind in kinds.items()
        },
    )


@contextlib.asynccontextmanager
async def echo_server(interceptors: Sequence[grpc.aio.ServerInterceptor]) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server on a free port that runs ``interceptors`` on every call."""
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((_handlers(),))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def answers(call: AsyncIterator[Any]) -> list[str]:
    """The echoed strings a streaming call answers, once it ends."""
    return [answer.service async for answer in call]


def unary_call(channel: grpc.aio.Channel, method: str = UNARY) -> Any:
    return channel.unary_unary(method, request_serializer=None, response_deserializer=Echo.FromString)


def response_stream_call(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        RESPONSE_STREAM, request_serializer=None, response_deserializer=Echo.FromString
    )


def stream_call(channel: grpc.aio.Channel, method: str = STREAM) -> Any:
    return channel.stream_stream(method, request_serializer=None, response_deserializer=Echo.FromString)
