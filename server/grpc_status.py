"""The one place where exceptions become gRPC statuses, for every grpc.aio servicer.

Domain errors (``server.errors``) carry a client-safe message and their status code; anything
else becomes INTERNAL with a generic message, and its traceback goes only to the log. Servicer
methods use ``@grpc_errors``; streaming code that reports errors in-band uses ``to_status``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc

from fineserve.server.errors import ServingError, status_of

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Method = Callable[[Servicer, Request, Context], Awaitable[Response]]


def to_status(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-safe message for an exception (logs unexpected ones)."""
    code, message = status_of(err)
    if not isinstance(err, ServingError):
        log.error("unexpected error while serving a request", exc_info=err)
    return grpc.StatusCode[code], message


def grpc_errors(method: Method[Servicer, Request, Response]) -> Method[Servicer, Request, Response]:
    """Decorates a unary grpc.aio servicer method: domain errors -> their status, rest -> INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if isinstance(err, grpc.aio.AbortError):
                raise  # the method aborted on its own
            code, message = to_status(err)
        await _abort(context, code, message)

    return wrapper


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


_CORRELATION_HEADERS = frozenset({"x-request-id", "traceparent", "tracestate"})


def headers_of(context: Context) -> dict[str, str]:
    """The request's correlation metadata: ``x-request-id`` and W3C trace context, if sent."""
    return {
        key: value
        for key, value in context.invocation_metadata() or ()
        if key in _CORRELATION_HEADERS and isinstance(value, str)
    }


def deadline_of(context: Context) -> float | None:
    """The request's gRPC deadline as an absolute ``time.monotonic()`` value (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def cancelled_of(context: Context) -> Callable[[], bool]:
    """A check the batcher calls before running a request: has the client cancelled it?"""
    cancelled: Callable[[], bool] = context.cancelled
    return cancelled
