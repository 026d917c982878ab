"""The malformed-request interceptor on a real grpc.aio server: bytes that are not the method's
request message get INVALID_ARGUMENT naming the method (or, in an in-band stream, an
``UnparsableRequest`` the method answers while the stream goes on); good requests pass untouched."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from fineserve.server.malformed import MalformedRequestInterceptor
from tests.server.echo_server import (
    IN_BAND_STREAM,
    MALFORMED,
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

GOOD = Echo(service="hi").SerializeToString()


def not_valid(method: str) -> str:
    return f"the request to {method} is not a valid message of its type (malformed protobuf or invalid UTF-8)"


def run_against_interceptor(scenario: Any) -> list[tuple[str, str]]:
    """Runs ``scenario(channel)`` against a server with the interceptor; returns the refusals counted."""
    counted: list[tuple[str, str]] = []

    async def main() -> None:
        interceptor = MalformedRequestInterceptor(
            in_band_streams=frozenset({IN_BAND_STREAM}),
            on_refused=lambda method, code: counted.append((method, code)),
        )
        async with echo_server([interceptor]) as channel:
            await scenario(channel)

    asyncio.run(main())
    return counted


def test_good_requests_pass_in_every_call_shape() -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        assert (await unary_call(channel)(GOOD, timeout=10)).service == "hi"
        assert await answers(response_stream_call(channel)(GOOD, timeout=10)) == ["hi", "hi"]
        assert await answers(stream_call(channel)(iter([GOOD, GOOD]), timeout=10)) == ["hi", "hi"]

    assert run_against_interceptor(scenario) == []


@pytest.mark.parametrize("method", [UNARY, RESPONSE_STREAM, STREAM])
def test_a_malformed_request_is_invalid_argument_naming_the_method(method: str) -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if method == UNARY:
                await unary_call(channel)(MALFORMED, timeout=10)
            elif method == RESPONSE_STREAM:
                await answers(response_stream_call(channel)(MALFORMED, timeout=10))
            else:  # the stream ends at the bad message
                await answers(stream_call(channel)(iter([GOOD, MALFORMED, GOOD]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == not_valid(method)

    assert run_against_interceptor(scenario) == [(method, "INVALID_ARGUMENT")]


def test_an_in_band_stream_answers_a_malformed_message_and_reads_on() -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        replies = await answers(
            stream_call(channel, IN_BAND_STREAM)(iter([GOOD, MALFORMED, GOOD]), timeout=10)
        )
        assert replies == ["hi", f"unparsable: {not_valid(IN_BAND_STREAM)}", "hi"]

    assert run_against_interceptor(scenario) == [(IN_BAND_STREAM, "INVALID_ARGUMENT")]
