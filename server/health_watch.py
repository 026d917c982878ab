"""The standard health service with a cap on open ``Watch`` streams.

Health is open to every caller (probes carry no secrets), and each ``Watch`` stays open for as
long as its client wants (issue #21 measured +82 MiB for 5,000 without a token). Past
``max_watches`` open at once, one more gets RESOURCE_EXHAUSTED; ``Check`` is never capped.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class CappedHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    def __init__(self, max_watches: int) -> None:
        super().__init__()
        self.max_watches = max_watches
        self.watching = 0

    async def Watch(  # noqa: N802  # the protocol's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.watching >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watching} health Watch streams are open (max_health_watches); use Check, "
                "or retry later",
            )
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1
