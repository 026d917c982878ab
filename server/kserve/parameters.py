"""A request's own fields, checked before it runs: its parameters (``timeout``, and those of
features we do not have), the model version, the repository name, model load parameters.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fineserve.export.contract import VERSION_RANGE
from fineserve.server.errors import InvalidInput
from fineserve.server.pb.inference import grpc_service_pb2 as pb


def request_timeout_us(parameters: Mapping[str, pb.InferParameter]) -> int | None:
    """The request's ``timeout`` parameter (microseconds), if given; must be a positive integer."""
    if "timeout" not in parameters:
        return None
    param = parameters["timeout"]
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter 'timeout' must be an integer (microseconds), got {choice}")
    value = int(getattr(param, choice))
    if value <= 0:
        raise InvalidInput(f"parameter 'timeout' must be > 0 microseconds, got {value}")
    return value


def check_request_parameters(parameters: Mapping[str, pb.InferParameter]) -> None:
    """Rejects the parameters of features we do not have (sequences, shared memory)."""
    for key in parameters:
        if key in ("sequence_id", "sequence_start", "sequence_end"):
            raise InvalidInput(f"parameter {key!r}: sequence batching is not supported")
        if key.startswith("shared_memory"):
            raise InvalidInput(f"parameter {key!r} belongs on an input or requested output, not the request")


def parse_version(version: str) -> int | None:
    """The request's version string: empty means the server's choice; else an integer in the
    contract's ``VERSION_RANGE`` (1..2**63-1, every version a repository can hold)."""
    if not version:
        return None
    # ASCII digits only (str.isdigit() also takes "²" and "١"), and no more than an int64 has
    # before int() (no 5000-digit conversions); leading zeros are taken, as they always were.
    digits = version.lstrip("0")
    if (
        not (version.isascii() and version.isdigit() and len(digits) <= len(str(VERSION_RANGE[1])))
        or not VERSION_RANGE[0] <= int(version) <= VERSION_RANGE[1]
    ):
        raise InvalidInput(
            f"model version {version[:40]!r} must be a positive integer up to {VERSION_RANGE[1]} "
            "(or empty for the newest)"
        )
    return int(version)


def deadline(parameters: Mapping[str, pb.InferParameter], grpc_deadline: float | None) -> float | None:
    """Absolute ``time.monotonic()`` deadline: the sooner of the gRPC deadline and ``timeout`` (µs)."""
    timeout_us = request_timeout_us(parameters)
    bounds = [] if grpc_deadline is None else [grpc_deadline]
    if timeout_us is not None:
        bounds.append(time.monotonic() + timeout_us / 1e6)
    return min(bounds, default=None)


def check_repository_name(name: str) -> None:
    if name:
        raise InvalidInput(
            f"repository {name!r}: fineserve serves one repository; leave repository_name empty"
        )


def check_no_load_parameters(parameters: Mapping[str, Any]) -> None:
    for key in parameters:
        raise InvalidInput(
            f"parameter {key!r} is not supported: models load from the repository as published (model.json)"
        )
