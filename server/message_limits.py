"""Per-model request size limits. gRPC checks one limit for the whole port, before a message is
parsed: the largest of the per-model ones. A model whose own limit is lower is checked here, once
the request is parsed and names its model."""

from __future__ import annotations

from typing import Protocol

from fineserve.server.config import Settings
from fineserve.server.errors import MessageTooLarge


class _Sized(Protocol):
    def ByteSize(self) -> int: ...  # noqa: N802  # protobuf's name


def check_message_size(settings: Settings, model: str, request: _Sized) -> None:
    """Raises ``MessageTooLarge`` for a request over ``model``'s own limit (RESOURCE_EXHAUSTED,
    the status gRPC answers for one over the port's)."""
    limit = settings.max_receive_message_bytes_for(model)
    if limit >= settings.grpc_max_receive_message_bytes:
        return  # gRPC has checked it already
    size = request.ByteSize()
    if size > limit:
        raise MessageTooLarge(
            f"the request message ({size} bytes) is larger than model {model!r} accepts "
            f"({limit} bytes: max_receive_message_bytes_per_model)"
        )
