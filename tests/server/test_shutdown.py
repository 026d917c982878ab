"""The shutdown gate on a real grpc.aio server: open, it lets calls through; closed, it answers
new calls but health checks with UNAVAILABLE before they run, and counts each refusal."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fineserve.server.shutdown import ShutdownGate
from tests.server.echo_server import (
    RESPONSE_STREAM,
    STREAM,
    UNARY,
    Echo,
    answers,
    echo_server,
    response_stream_call,
    stream_call,
    unary_call,
)

REFUSAL = "the server is shutting down; retry elsewhere"


def test_an_open_gate_lets_every_call_through() -> None:
    counted: list[tuple[str, str]] = []

    async def scenario() -> None:
        gate = ShutdownGate(on_refused=lambda method, code: counted.append((method, code)))
        async with echo_server([gate]) as channel:
            request = Echo(service="hi").SerializeToString()
            assert (await unary_call(channel)(request, timeout=10)).service == "hi"
            assert await answers(response_stream_call(channel)(request, timeout=10)) == ["hi"] * 2
            assert await answers(stream_call(channel)(iter([request]), timeout=10)) == ["hi"]
        assert (gate.closed, gate.last_refused) == (False, float("-inf"))

    asyncio.run(scenario())
    assert counted == []


def test_a_closed_gate_refuses_new_calls_of_every_shape_but_health_checks() -> None:
    counted: list[tuple[str, str]] = []

    async def scenario() -> None:
        gate = ShutdownGate(on_refused=lambda method, code: counted.append((method, code)))
        async with echo_server([gate]) as channel:
            gate.close()
            before = time.monotonic()
            request = Echo(service="hi").SerializeToString()
            calls = [
                lambda: unary_call(channel)(request, timeout=10),
                lambda: answers(response_stream_call(channel)(request, timeout=10)),
                lambda: answers(stream_call(channel)(iter([request]), timeout=10)),
            ]
            for call in calls:  # one after another: counted in this order
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call()
                assert (refused.value.code(), refused.value.details()) == (
                    grpc.StatusCode.UNAVAILABLE,
                    REFUSAL,
                )
            assert gate.last_refused >= before
            # Health checks still answer: load balancers must see the server go NOT_SERVING.
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())
    assert counted == [
        (UNARY, "UNAVAILABLE"),
        (RESPONSE_STREAM, "UNAVAILABLE"),
        (STREAM, "UNAVAILABLE"),
    ]
