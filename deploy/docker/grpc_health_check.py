"""Container health check: asks the server's gRPC health service whether it is SERVING.

Docker's HEALTHCHECK runs it inside the serving image; exit status 0 means healthy, 1 unhealthy
(NOT_SERVING while models load or on shutdown, nothing listening, or no answer in time). It
needs only grpcio and grpcio-health-checking, which the serving install already has.

Address: ``FINESERVE_HEALTH_ADDRESS`` if set, else ``127.0.0.1:$FINESERVE_GRPC_PORT`` (8001).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def default_address() -> str:
    port = os.environ.get("FINESERVE_GRPC_PORT", "8001")
    return os.environ.get("FINESERVE_HEALTH_ADDRESS", f"127.0.0.1:{port}")


def check(address: str, service: str = "", timeout: float = TIMEOUT_S) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...) or the gRPC error code's name."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            return code.name if code is not None else "UNKNOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    address = args[0] if args else default_address()
    status = check(address)
    if status != "SERVING":
        print(f"unhealthy: {address} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
