"""The server's domain errors and the one table that maps them to gRPC status codes.

The core raises these; only the transport layer turns them into statuses (``status_of``).
Each error carries a message that is safe to send to the client: it names the problem and the
limit, never internal details. Anything that is not a ``ServingError`` becomes ``INTERNAL`` with
a generic message, and its traceback goes only to the log.
"""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    """Base of every error whose message may reach the client."""

    # The gRPC status code name (grpc.StatusCode[...]); kept as a string so the core
    # does not import grpc.
    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    """Malformed request: wrong/missing inputs, dtype, shape, undecodable image, a limit exceeded."""

    status = "INVALID_ARGUMENT"


class LimitExceeded(InvalidInput):
    """A request over a configured limit (pixels, bytes, items, text length); names the limit."""


class ModelNotFound(ServingError):
    """No such model, or no such version of it."""

    status = "NOT_FOUND"


class RegionNotFound(ServingError):
    """No shared memory region is registered under that name (asked for its status)."""

    status = "NOT_FOUND"


class AlreadyExists(ServingError):
    """A name that must be new is taken (a shared memory region registered twice)."""

    status = "ALREADY_EXISTS"


class RegionLimitReached(ServingError):
    """As many shared memory regions are registered as the open-files limit leaves room for."""

    status = "RESOURCE_EXHAUSTED"


class DeviceUnavailable(ServingError):
    """An operation that needs a CUDA device, on a server without a usable one (the reason says why)."""

    status = "FAILED_PRECONDITION"


class ModelNotReady(ServingError):
    """The model exists but is loading, unloading or failed to load."""

    status = "UNAVAILABLE"


class ServerShuttingDown(ServingError):
    status = "UNAVAILABLE"


class Overloaded(ServingError):
    """The model's queue is full: rejected at once rather than queued."""

    status = "RESOURCE_EXHAUSTED"


class MessageTooLarge(ServingError):
    """A request message over its model's ``max_receive_message_bytes_per_model``; gRPC answers
    the same status for one over the server-wide limit."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it could run; it was dropped unrun."""

    status = "DEADLINE_EXCEEDED"


class Cancelled(ServingError):
    status = "CANCELLED"


class Unimplemented(ServingError):
    status = "UNIMPLEMENTED"


class PermissionDenied(ServingError):
    """An operation switched off by configuration (e.g. model load/unload)."""

    status = "PERMISSION_DENIED"


class Unauthenticated(ServingError):
    status = "UNAUTHENTICATED"


class InferenceFailed(ServingError):
    """The runtime failed on a batch; the message stays generic, the details go to the log."""

    status = "INTERNAL"


class ModelFault(InferenceFailed):
    """The model answered a request it accepted with NaN or infinite scores: the model's fault, not
    the client's, and the message says so (never an OK reply with such scores)."""


INTERNAL_MESSAGE = "internal error; see the server log"


def status_of(err: BaseException) -> tuple[str, str]:
    """The (status code name, client-safe message) for an exception: the one mapping table."""
    if isinstance(err, ServingError):
        return err.status, err.message
    return "INTERNAL", INTERNAL_MESSAGE
