"""Who may call the gRPC port: TLS (optionally mutual) and bearer tokens checked per method.

``AuthInterceptor`` checks a call's ``authorization: Bearer <token>`` metadata before its request
is parsed: health, reflection and KServe liveness/readiness are open, model management and shared
memory registration need the admin token, everything else the inference token
(docs/reliability.md, Who may call).
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import SecretStr

from fineserve.server.config import Settings, SettingsError, read_token_file
from fineserve.server.refusal import HEALTH_PREFIX, OnRefused, not_counted, refusal

log = logging.getLogger(__name__)

KSERVE = "/inference.GRPCInferenceService/"
OPEN_PREFIXES = (HEALTH_PREFIX, "/grpc.reflection.")
OPEN_METHODS = frozenset({KSERVE + "ServerLive", KSERVE + "ServerReady"})
# Management: what changes the server for every client. Shared memory regions are management
# too: registering one has the server read and write a memory object of this host, and the names
# and keys of every client's regions are listed by status and dropped by an unregister of "".
MANAGEMENT_METHODS = frozenset(
    {
        KSERVE + "RepositoryModelLoad",
        KSERVE + "RepositoryModelUnload",
        *(
            f"{KSERVE}{kind}SharedMemory{call}"
            for kind in ("System", "Cuda")
            for call in ("Register", "Status", "Unregister")
        ),
    }
)
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
    check_certificate_dates(settings.tls_cert_file, settings.tls_expiry_warning_days)
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


@dataclass(frozen=True)
class CertificateValidity:
    not_before: float  # seconds since the epoch
    not_after: float

    def seconds_left(self, now: float | None = None) -> float:
        return self.not_after - (time.time() if now is None else now)


def certificate_validity(cert: Path) -> CertificateValidity:
    """When the first certificate of a PEM file becomes valid and expires.

    Raises:
        SettingsError: not a PEM certificate.
    """
    try:
        # The standard library's own certificate parser (what getpeercert() returns); the
        # ``cryptography`` package is not a dependency.
        decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
        return CertificateValidity(
            not_before=ssl.cert_time_to_seconds(decoded["notBefore"]),
            not_after=ssl.cert_time_to_seconds(decoded["notAfter"]),
        )
    except (ssl.SSLError, OSError, KeyError, ValueError) as err:
        raise SettingsError(f"tls_cert_file {cert} is not a PEM certificate ({err})") from None


def check_certificate_dates(cert: Path, warning_days: float, now: float | None = None) -> CertificateValidity:
    """Refuses a certificate that is expired or not yet valid: gRPC would start, report SERVING
    and fail every handshake. Warns when it expires within ``warning_days``.

    Raises:
        SettingsError: expired, or not valid yet; the message says when.
    """
    validity = certificate_validity(cert)
    now = time.time() if now is None else now
    if validity.not_after <= now:
        raise SettingsError(
            f"tls_cert_file {cert} expired on {_utc(validity.not_after)}: every TLS handshake would fail; "
            "renew it"
        )
    if validity.not_before > now:
        raise SettingsError(
            f"tls_cert_file {cert} is not valid until {_utc(validity.not_before)}: every TLS handshake "
            "would fail (is this host's clock right?)"
        )
    days_left = validity.seconds_left(now) / 86400
    if days_left < warning_days:
        log.warning(
            "tls_cert_file %s expires on %s, in %.1f days: renew it (tls_expiry_warning_days=%g)",
            cert,
            _utc(validity.not_after),
            days_left,
            warning_days,
        )
    return validity


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


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


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this host only (``[::]`` and ``0.0.0.0`` reach every interface)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def open_control(settings: Settings, tokens: Tokens) -> list[str]:
    """What anyone who reaches a non-loopback gRPC port may do to the server without a token:
    load and unload models, read and write this host's shared memory. Empty on loopback."""
    if is_loopback(settings.grpc_host):
        return []
    opened = []
    if settings.allow_model_control and tokens.required(Access.MANAGEMENT) is None:
        opened.append("load and unload models (set admin_token, or allow_model_control=false)")
    if settings.system_shared_memory and tokens.required(Access.INFERENCE) is None:
        opened.append(
            "register this host's shared memory (set inference_token, or system_shared_memory=false)"
        )
    return opened


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

    def __init__(self, tokens: Tokens, on_refused: OnRefused | None = None) -> None:
        self._tokens = tokens
        self._on_refused = on_refused or not_counted
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
        return refusal(
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
