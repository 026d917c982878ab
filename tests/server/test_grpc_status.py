"""The one exception -> status mapping: domain errors keep their message, the rest become INTERNAL."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from fineserve.server import errors
from fineserve.server.grpc_status import to_status
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.fixtures import publish_graph_that_fails_above_batch_1
from tests.server.running import RunningServer


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.LimitExceeded("max_x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
        (errors.ModelNotReady("m"), grpc.StatusCode.UNAVAILABLE),
        (errors.Overloaded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("gone"), grpc.StatusCode.CANCELLED),
        (errors.PermissionDenied("off"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_domain_errors_keep_their_message(error: errors.ServingError, code: grpc.StatusCode) -> None:
    assert to_status(error) == (code, error.message)


def test_anything_else_is_internal_with_a_generic_message_and_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise KeyError("secret internal detail")
    except KeyError as err:
        code, message = to_status(err)
    assert code == grpc.StatusCode.INTERNAL
    assert message == errors.INTERNAL_MESSAGE and "secret" not in message
    assert "secret internal detail" in caplog.text and "Traceback" in caplog.text


def test_a_failing_batch_is_internal_without_details_and_the_server_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = tmp_path / "models"
    publish_graph_that_fails_above_batch_1(repository)
    tensor = pb.Tensor(shape=[3, 8, 8], fp32_data=np.zeros((3, 8, 8), "<f4").tobytes())
    request = pb.ClassifyRequest(model="brittle", images=[pb.ImageInput(tensor=tensor)] * 2)
    with (
        caplog.at_level(logging.ERROR),
        RunningServer(repository) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.FineserveStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(request)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == "model brittle/1: inference failed; see the server log"
        one = pb.ClassifyRequest(model="brittle", images=[pb.ImageInput(tensor=tensor)])
        assert len(stub.Classify(one).results) == 1  # still serving
    assert "batch of 1 requests failed" in caplog.text and "Reshape" in caplog.text
