"""The request log: failed and slow requests with id, model, version, status and timings; never
the payload."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import grpc
import pytest

from fineserve.server.config import load_settings
from fineserve.server.kserve.tensors import encode_bytes_elements
from fineserve.server.logs import configure_logging
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as kpb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.observability.conftest import tensor_request
from tests.server.running import RunningServer

CANARY = "zebra-canary-8472"


@pytest.fixture
def log_output(restored_logging: None) -> io.StringIO:
    """Where the server's log goes during the test; the logging setup is restored afterwards."""
    return io.StringIO()


def request_lines(text: str) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    return [e for e in entries if e["logger"] == "fineserve.server.requests"]


def test_json_request_log_has_ids_status_and_timings_and_never_the_payload(
    tiny_repository: Path, log_output: io.StringIO
) -> None:
    # Everything logged: DEBUG level, every request (threshold 0).
    configure_logging(load_settings(log_format="json", log_level="DEBUG"), log_output)
    with (
        RunningServer(tiny_repository, max_text_chars=100, log_slow_request_ms=0) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        ours, kserve = pb_grpc.FineserveStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        ours.AnalyzeSentiment(
            pb.AnalyzeSentimentRequest(model="tiny-text", texts=[f"a good {CANARY} movie"]),
            metadata=[("x-request-id", "req-42")],
        )
        failures = [
            # Too long: the limit is named, the text is not repeated.
            lambda: ours.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=[CANARY * 10])),
            # Not an image: the item is named, its bytes are not.
            lambda: ours.Classify(
                pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(encoded=CANARY.encode())])
            ),
            # Not UTF-8, through KServe.
            lambda: kserve.ModelInfer(kserve_bytes("tiny-text", CANARY.encode() + b"\xff")),
        ]
        for send in failures:
            with pytest.raises(grpc.RpcError) as err:
                send()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    text = log_output.getvalue()
    assert CANARY not in text
    lines = request_lines(text)
    [ok] = [e for e in lines if e["status"] == "OK"]
    assert (ok["message"], ok["level"], ok["request_id"]) == ("request", "INFO", "req-42")
    assert (ok["model"], ok["version"], ok["items"]) == ("tiny-text", 1, 1)
    for key in ("duration_ms", "preprocess_ms", "queue_ms", "inference_ms"):
        assert isinstance(ok[key], float) and ok[key] >= 0, key
    assert float(str(ok["duration_ms"])) > 0
    failed = [e for e in lines if e["status"] != "OK"]
    assert [e["status"] for e in failed] == ["INVALID_ARGUMENT"] * 3
    assert all(e["message"] == "request failed" and e["error"] for e in failed)
    assert "max_text_chars" in str(failed[0]["error"])
    ids = [e["request_id"] for e in failed]
    assert len(set(ids)) == 3 and all(len(str(i)) == 16 for i in ids)


def kserve_bytes(model: str, data: bytes) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model)
    request.inputs.add(name="texts", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_elements([data]))
    return request


def test_text_log_has_slow_and_failed_requests_only(tiny_repository: Path, log_output: io.StringIO) -> None:
    configure_logging(load_settings(), log_output)
    # tiny-image requests wait out a 400 ms batching delay: slow against a 300 ms threshold.
    with (
        RunningServer(
            tiny_repository,
            log_slow_request_ms=300,
            batching={"tiny-image": {"max_queue_delay_ms": 400}},
            batch_wait="fixed",
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        ours = pb_grpc.FineserveStub(channel)
        ours.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=["fine"]))
        ours.Classify(tensor_request("tiny-image", 1))
        with pytest.raises(grpc.RpcError):
            ours.Classify(tensor_request("no-such-model", 1))
    lines = [line for line in log_output.getvalue().splitlines() if " fineserve.server.requests: " in line]
    assert len(lines) == 2, lines
    slow, failed = lines
    assert "WARNING fineserve.server.requests: slow request request_id=" in slow
    assert " model=tiny-image version=1 status=OK items=1 " in slow
    assert float(slow.split("queue_ms=")[1].split()[0]) >= 400
    assert "INFO fineserve.server.requests: request failed " in failed
    assert ' model=no-such-model version="" status=NOT_FOUND ' in failed
    assert "error=\"model 'no-such-model' is not in the repository\"" in failed


def test_text_log_fields_are_one_token_each_whatever_a_client_sends(log_output: io.StringIO) -> None:
    configure_logging(load_settings(log_format="text", log_level="INFO"), log_output)
    forged = "x\nERROR fake line\x1b[31m"
    logging.getLogger("fineserve.server.requests").info(
        "request failed", extra={"fields": {"model": forged, "status": "NOT_FOUND", "note": "a b"}}
    )
    (line,) = log_output.getvalue().splitlines()  # the newline did not start a line of its own
    assert "\x1b" not in line
    assert ' model="x\\nERROR fake line\\u001b[31m" status=NOT_FOUND note="a b"' in line
