"""Requests that are not even protobuf: bytes that do not parse as the method's request message
get INVALID_ARGUMENT naming the method, instead of gRPC's UNKNOWN naming a Python exception class.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fineserve.server.refusal import OnRefused, not_counted

_UNPARSABLE = object()


class UnparsableRequest:
    """Stands in a request stream for a message that did not parse, for the methods that answer
    it in band (``in_band_streams``) and go on with the stream."""

    def __init__(self, message: str) -> None:
        self.message = message


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Bytes that do not parse as the method's request message (a string field holding invalid
    UTF-8, a truncated or corrupt message) get INVALID_ARGUMENT naming the method. Left alone, gRPC
    answers UNKNOWN with the parser's exception class in the message.

    In a request stream the message boundaries still hold, so a stream method named in
    ``in_band_streams`` receives an ``UnparsableRequest`` in its place, answers it and reads on
    (KServe's ModelStreamInfer reports errors per message); any other request stream ends with
    INVALID_ARGUMENT at the bad message.
    """

    def __init__(
        self,
        in_band_streams: frozenset[str] = frozenset(),
        on_refused: OnRefused | None = None,
    ) -> None:
        self._in_band_streams = in_band_streams
        # Hears of each unparsable request (method, "INVALID_ARGUMENT"), for metrics.
        self._on_refused = on_refused or not_counted

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        why = "malformed protobuf or invalid UTF-8"
        message = f"the request to {method} is not a valid message of its type ({why})"

        def refused() -> None:
            self._on_refused(method, grpc.StatusCode.INVALID_ARGUMENT.name)

        if handler.unary_unary is not None:
            return _guarded(handler, message, refused)
        if handler.stream_stream is not None:
            return _guarded_stream(handler, message, refused, in_band=method in self._in_band_streams)
        if handler.unary_stream is not None:
            return _guarded_response_stream(handler, message, refused)
        # Stream-unary methods (none served): gRPC's own answer stands.
        return handler


def _lenient(parse: Callable[[bytes], Any], unparsable: Callable[[], Any]) -> Callable[[bytes], Any]:
    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:
            return unparsable()

    return lenient


_Refusal = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[None]]


def _refusal_of_unparsable(message: str, refused: Callable[[], None]) -> _Refusal:
    """What every guard does with a request that did not parse: count it, end the call with
    INVALID_ARGUMENT; any other request passes."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if request is _UNPARSABLE:
            refused()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    return refuse


def _unparsable_marked(handler: grpc.RpcMethodHandler) -> Callable[[bytes], Any]:
    return _lenient(handler.request_deserializer, lambda: _UNPARSABLE)


def _guarded(
    handler: grpc.RpcMethodHandler, message: str, refused: Callable[[], None]
) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary
    refuse = _refusal_of_unparsable(message, refused)

    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(request, context)
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        checked,
        request_deserializer=_unparsable_marked(handler),
        response_serializer=handler.response_serializer,
    )


def _guarded_response_stream(
    handler: grpc.RpcMethodHandler, message: str, refused: Callable[[], None]
) -> grpc.RpcMethodHandler:
    """One request, a stream of answers (health Watch): an unparsable request ends the call with
    INVALID_ARGUMENT before any answer (gRPC's own is UNKNOWN, naming a Python exception class)."""
    inner = handler.unary_stream
    refuse = _refusal_of_unparsable(message, refused)

    async def generated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await refuse(request, context)
        async for response in inner(request, context):
            yield response

    async def written(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await refuse(request, context)  # health's Watch writes with context.write
        await inner(request, context)

    return grpc.unary_stream_rpc_method_handler(
        generated if inspect.isasyncgenfunction(inner) else written,
        request_deserializer=_unparsable_marked(handler),
        response_serializer=handler.response_serializer,
    )


def _guarded_stream(
    handler: grpc.RpcMethodHandler, message: str, refused: Callable[[], None], *, in_band: bool
) -> grpc.RpcMethodHandler:
    if in_band:

        def unparsable() -> UnparsableRequest:
            refused()
            return UnparsableRequest(message)

        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream,
            request_deserializer=_lenient(handler.request_deserializer, unparsable),
            response_serializer=handler.response_serializer,
        )
    inner = handler.stream_stream
    if not inspect.isasyncgenfunction(inner):
        return handler  # reads with context.read(): gRPC's own answer stands
    refuse = _refusal_of_unparsable(message, refused)

    async def checked(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                await refuse(request, context)
                yield request

        async for response in inner(parsed(), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(
        checked,
        request_deserializer=_unparsable_marked(handler),
        response_serializer=handler.response_serializer,
    )
