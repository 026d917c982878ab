"""How the server's interceptors refuse a call: a handler that answers a status without reading
a byte of the request, and the callback that counts each refusal for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

# Hears of each refused call: (method, status code name).
OnRefused = Callable[[str, str], None]
# The standard health service: no interceptor ever turns its checks away.
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def not_counted(method: str, code: str) -> None:
    """The default ``on_refused``: no metrics."""


def refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, answered: Callable[[], object]
) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` without reading the request: it is request-streaming
    whatever ``handler`` is, and never iterates the requests. gRPC receives a unary request's
    whole message before its handler runs, so a unary refusal would answer only once a client
    that declares 60 MiB has sent them all, holding them meanwhile; a streaming one answers at
    once, and the bytes still on their way are dropped with the stream. ``answered`` runs when it
    does: an outer interceptor may still replace it, and a call is counted only for the answer
    it gets."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        answered()
        await context.abort(code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)
