"""A request's own fields (``server/kserve/parameters.py``): parameters, deadline, model version,
repository name, load parameters."""

from __future__ import annotations

import time

from fineserve.server.kserve.parameters import (
    check_no_load_parameters,
    check_repository_name,
    check_request_parameters,
    deadline,
    parse_version,
    request_timeout_us,
)
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from tests.server.kserve.builders import invalid


def test_request_parameters_and_version() -> None:
    request = pb.ModelInferRequest()
    assert request_timeout_us(request.parameters) is None
    request.parameters["timeout"].int64_param = 1500
    assert request_timeout_us(request.parameters) == 1500
    request.parameters["timeout"].string_param = "1s"
    with invalid("'timeout' must be an integer"):
        request_timeout_us(request.parameters)
    request.parameters["timeout"].int64_param = -5
    with invalid("must be > 0 microseconds"):
        request_timeout_us(request.parameters)
    request.parameters["priority"].uint64_param = 1
    check_request_parameters(request.parameters)
    request.parameters["sequence_id"].int64_param = 3
    with invalid("sequence batching is not supported"):
        check_request_parameters(request.parameters)
    assert parse_version("") is None
    assert parse_version("12") == 12
    # The contract's range, every version a repository can hold: 1..2**63-1, leading zeros taken.
    assert parse_version(str(10**18)) == 10**18
    assert parse_version(str(2**63 - 1)) == 2**63 - 1
    assert parse_version("0" * 30 + "7") == 7
    with invalid("must be a positive integer up to 9223372036854775807"):
        parse_version(str(2**63))
    # "²" passes str.isdigit() and breaks int(); "１" (full width) and "٣" would pass as 1 and 3.
    for bad in ("0", "-1", "v1", "1.0", "\u00b2", "\uff11", "\u0663", "9" * 19, "9" * 5000):
        with invalid("must be a positive integer"):
            parse_version(bad)


def test_the_deadline_is_the_sooner_of_grpc_and_the_timeout_parameter() -> None:
    request = pb.ModelInferRequest()
    assert deadline(request.parameters, None) is None
    assert deadline(request.parameters, 123.0) == 123.0
    request.parameters["timeout"].int64_param = 2_000_000  # 2 s
    before = time.monotonic()
    until = deadline(request.parameters, None)
    assert until is not None and before + 2 <= until <= time.monotonic() + 2
    assert deadline(request.parameters, before + 1) == before + 1  # the gRPC deadline is sooner
    request.parameters["timeout"].int64_param = 0
    with invalid("must be > 0 microseconds"):
        deadline(request.parameters, None)


def test_one_repository_and_no_load_parameters() -> None:
    check_repository_name("")
    with invalid("repository 'other': fineserve serves one repository; leave repository_name empty"):
        check_repository_name("other")
    check_no_load_parameters({})
    with invalid("parameter 'config' is not supported: models load from the repository as published"):
        check_no_load_parameters({"config": "{}"})
