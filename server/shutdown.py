"""The shutdown gate: once the server starts stopping, new calls are refused at once.

``app.Server.stop`` closes the gate, then drains the calls already accepted (docs/reliability.md,
Shutdown).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc

from fineserve.server.refusal import HEALTH_PREFIX, OnRefused, not_counted, refusal


class ShutdownGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Once ``close`` is called, new calls (but health checks) get UNAVAILABLE at once: never run,
    safe to retry elsewhere. Without it, a call that reaches gRPC after its own stop began waits
    in gRPC's queue and is CANCELLED when the port closes, which a client cannot tell from a
    request that was cancelled while running."""

    def __init__(self, on_refused: OnRefused | None = None) -> None:
        self.closed = False
        # Set by ``close``: what request streams already open wait on (server/kserve/service.py).
        self.stopping = asyncio.Event()
        self.last_refused = float("-inf")  # time.monotonic() of the latest refusal
        self._on_refused = on_refused or not_counted

    def close(self) -> None:
        self.closed = True
        self.stopping.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if not self.closed or handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        self.last_refused = time.monotonic()
        method = handler_call_details.method
        return refusal(
            handler,
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down; retry elsewhere",
            lambda: self._on_refused(method, grpc.StatusCode.UNAVAILABLE.name),
        )
