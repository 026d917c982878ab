"""Who may call the server: TLS (optionally mutual) and bearer tokens, for the gRPC port.

TLS: with ``tls_cert_file`` and ``tls_key_file`` the port speaks TLS only; with
``tls_require_client_cert`` every client must present a certificate signed by
``tls_client_ca_file`` (mutual TLS), checked by gRPC during the handshake.

Tokens: ``AuthInterceptor`` checks the ``authorization: Bearer <token>`` metadata of each call
before the call's handler runs (before its request is even parsed). Three kinds of method:

- open: the standard health service, reflection, and KServe ServerLive/ServerReady (probes must
  work without secrets; they reveal nothing about models);
- management (KServe RepositoryModelLoad/Unload): the admin token if one is set, else the
  inference token's rule;
- everything else (inference, metadata, statistics, model lists): the inference token.

A kind whose token is unset is open. Missing or wrong tokens get UNAUTHENTICATED; tokens are
compared in constant time (``hmac.compare_digest``) and never logged.
"""

from __future__ import annotations

import enum
import hmac
import inspect
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import SecretStr

from fineserve.server.config import Settings, SettingsError, read_token_file

log = logging.getLogger(__name__)

KSERVE = "/inference.GRPCInferenceService/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
OPEN_METHODS = frozenset({KSERVE + "ServerLive", KSERVE + "ServerReady"})
MANAGEMENT_METHODS = frozenset({KSERVE + "RepositoryModelLoad", KSERVE + "RepositoryModelUnload"})
_BEARER = "bearer "
# At most one log line about rejected calls per this many seconds (a flood must not flood the log).
_REJECTION_LOG_INTERVAL_S = 60.0


class Access(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    MANAGEMENT = "management"


def access_of(method: str) -> Access:
    """Which rule a fully qualified method name (``/package.Service/Method``) falls under."""
    if method in OPEN_METHODS or method.startswith(OPEN_PREFIXES):
        return Access.OPEN
    if method in MANAGEMENT_METHODS:
        return Access.MANAGEMENT
    return Access.INFERENCE


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files; None when TLS is off.

    Raises:
        SettingsError: files that are not a PEM certificate and its key, or PEM CA certificates
            (gRPC itself would only fail to bind, blaming the address).
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    _check_tls_files(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=settings.tls_require_client_cert,
    )


def _check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: an encrypted key fails here instead of prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as err:
        why = getattr(err, "reason", None) or err
        raise SettingsError(
            f"tls_cert_file {cert} and tls_key_file {key} are not a PEM certificate and its unencrypted "
            f"private key ({why})"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as err:
            why = getattr(err, "reason", None) or err
            raise SettingsError(
                f"tls_client_ca_file {client_ca} is not PEM CA certificates ({why})"
            ) from None


def read_token(value: SecretStr | None, path: Path | None) -> bytes | None:
    """The token from the setting itself or from its file (whitespace stripped); None: no token.

    Raises:
        SettingsError: the file is unreadable, not UTF-8 text, or empty.
    """
    if value is not None:
        return value.get_secret_value().strip().encode()
    if path is not None:
        try:
            return read_token_file(path).encode()
        except ValueError as err:  # checked with the settings, but the file may have changed since
            raise SettingsError(f"token file {err}") from None
    return None


@dataclass(frozen=True)
class Tokens:
    inference: bytes | None
    admin: bytes | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        return cls(
            inference=read_token(settings.inference_token, settings.inference_token_file),
            admin=read_token(settings.admin_token, settings.admin_token_file),
        )

    def required(self, access: Access) -> bytes | None:
        """The token a call of this kind must carry; None: no token needed."""
        if access is Access.OPEN:
            return None
        if access is Access.MANAGEMENT and self.admin is not None:
            return self.admin
        return self.inference

    def describe(self) -> str:
        """For the startup log: which tokens are on (never their values)."""
        inference = "token" if self.inference else "open"
        admin = "admin token" if self.admin else f"as inference ({inference})"
        return f"inference {inference}, management {admin}, health and reflection open"


def presented_token(metadata: Any) -> bytes | None:
    """The bearer token of a call's ``authorization`` metadata, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if text[: len(_BEARER)].lower() == _BEARER:
            return text[len(_BEARER) :].strip().encode("latin-1", errors="replace")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Refuses calls without the token their method needs, with UNAUTHENTICATED; ``on_refused``
    hears of each (method, status code name), for metrics."""

    def __init__(self, tokens: Tokens, on_refused: Callable[[str, str], None] | None = None) -> None:
        self._tokens = tokens
        self._on_refused = on_refused or _not_counted
        self._rejected_since_log = 0
        self._last_log = float("-inf")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        needed = self._tokens.required(access_of(method))
        handler = await continuation(handler_call_details)
        if needed is None or handler is None:
            return handler
        given = presented_token(handler_call_details.invocation_metadata)
        if given is not None and hmac.compare_digest(given, needed):
            return handler
        message = "missing bearer token" if given is None else "invalid bearer token"
        self._log_rejection(method, message)
        return _refusal(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{message} (authorization: Bearer <token> metadata)",
            lambda: self._on_refused(method, grpc.StatusCode.UNAUTHENTICATED.name),
        )

    def _log_rejection(self, method: str, why: str) -> None:
        self._rejected_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= _REJECTION_LOG_INTERVAL_S:
            log.warning(
                "refused %d unauthenticated call(s) in the last %.0f s; latest: %s (%s)",
                self._rejected_since_log,
                min(now - self._last_log, _REJECTION_LOG_INTERVAL_S),
                method,
                why,
            )
            self._rejected_since_log = 0
            self._last_log = now


def _not_counted(method: str, code: str) -> None:
    """The default ``on_refused``: no metrics."""


def _refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, answered: Callable[[], object]
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers ``code`` without reading the request
    (no deserializer: the bytes are never parsed). ``answered`` runs when it does: an outer
    interceptor may still replace it, and a call is counted only for the answer it gets."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        answered()
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


# --- shutting down -------------------------------------------------------------------------------


class ShutdownGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Once ``close`` is called, new calls (but health checks) get UNAVAILABLE at once: never run,
    safe to retry elsewhere. Without it, a call that reaches gRPC after its own stop began waits
    in gRPC's queue and is CANCELLED when the port closes, which a client cannot tell from a
    request that was cancelled while running."""

    def __init__(self, on_refused: Callable[[str, str], None] | None = None) -> None:
        self.closed = False
        self.last_refused = float("-inf")  # time.monotonic() of the latest refusal
        self._on_refused = on_refused or _not_counted

    def close(self) -> None:
        self.closed = True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if not self.closed or handler is None or handler_call_details.method.startswith(OPEN_PREFIXES[0]):
            return handler
        self.last_refused = time.monotonic()
        method = handler_call_details.method
        return _refusal(
            handler,
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down; retry elsewhere",
            lambda: self._on_refused(method, grpc.StatusCode.UNAVAILABLE.name),
        )


# --- requests that are not even protobuf --------------------------------------------------------

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
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self._in_band_streams = in_band_streams
        # Hears of each unparsable request (method, "INVALID_ARGUMENT"), for metrics.
        self._on_refused = on_refused or _not_counted

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
