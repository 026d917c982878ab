"""``fineserve.client``: the typed clients (sync and async) against a real server, plain and with
mutual TLS and a bearer token; ``Credentials`` refuses half set-ups and never shows its secrets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fineserve.client import Credentials, FineserveClient, SyncFineserveClient
from tests.fixtures import publish_tiny_models
from tests.reliability import images
from tests.reliability.certs import Pki, make_pki
from tests.server.running import RunningServer

TOKEN = "inference-s3cret-0123456789"
PNG = images.png(images.rgb_pixels())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_models(tmp_path_factory.mktemp("client") / "models")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def plain(repository: Path) -> Iterator[RunningServer]:
    with RunningServer(repository, repository_poll_s=0, metrics_port=-1) as server:
        yield server


def _code_of(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_the_sync_client_calls_every_method(plain: RunningServer) -> None:
    with SyncFineserveClient(plain.target) as client:
        [labels] = client.classify("tiny-image", [PNG], top_k=1)
        assert labels[0].label.startswith("class_")
        [sentiment] = client.analyze_sentiment("tiny-text", ["good"])
        assert sentiment.label == "positive" and len(sentiment.scores) == 2
        assert {m.name for m in client.list_models()} == {"tiny-image", "tiny-text"}


def test_the_async_client_gives_the_same_answers(plain: RunningServer) -> None:
    async def ask() -> tuple[object, object]:
        async with FineserveClient(plain.target) as client:
            return (
                await client.classify("tiny-image", [PNG], top_k=3),
                await client.analyze_sentiment("tiny-text", ["good", "bad"]),
            )

    with SyncFineserveClient(plain.target) as client:
        expected = (
            client.classify("tiny-image", [PNG], top_k=3),
            client.analyze_sentiment("tiny-text", ["good", "bad"]),
        )
    assert asyncio.run(ask()) == expected


def test_a_refused_call_raises_the_documented_status(plain: RunningServer) -> None:
    with SyncFineserveClient(plain.target) as client:
        assert _code_of(lambda: client.classify("no-such-model", [PNG])) == grpc.StatusCode.NOT_FOUND


def test_mutual_tls_and_a_token_reach_a_secured_server(repository: Path, pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    tls = {
        "tls_cert_file": pki.server_cert,
        "tls_key_file": pki.server_key,
        "tls_client_ca_file": pki.ca_cert,
        "tls_require_client_cert": True,
    }
    with RunningServer(
        repository, repository_poll_s=0, metrics_port=-1, inference_token=TOKEN, **tls
    ) as server:
        good = Credentials.from_files(
            ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key, token_file=token_file
        )
        with SyncFineserveClient(server.target, credentials=good, timeout=10) as client:
            assert client.classify("tiny-image", [PNG], top_k=1)[0][0].label
            assert client.analyze_sentiment("tiny-text", ["fine"])[0].label

        async def classify_async() -> str:
            async with FineserveClient(server.target, credentials=good, timeout=10) as client:
                return (await client.classify("tiny-image", [PNG], top_k=1))[0][0].label

        assert asyncio.run(classify_async())

        without_token = Credentials.from_files(
            ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key
        )
        with SyncFineserveClient(server.target, credentials=without_token, timeout=10) as client:
            assert _code_of(lambda: client.classify("tiny-image", [PNG])) == grpc.StatusCode.UNAUTHENTICATED
        without_certificate = Credentials.from_files(ca_file=pki.ca_cert, token=TOKEN)
        with SyncFineserveClient(server.target, credentials=without_certificate, timeout=10) as client:
            assert _code_of(lambda: client.classify("tiny-image", [PNG])) == grpc.StatusCode.UNAVAILABLE


def test_credentials_refuse_half_set_ups_and_hide_secrets(pki: Pki) -> None:
    with pytest.raises(ValueError, match="private key"):
        Credentials.from_files(ca_file=pki.ca_cert, cert_file=pki.client_cert)
    with pytest.raises(ValueError, match="tls=True"):
        Credentials(root_certificates=pki.ca_cert.read_bytes())
    with pytest.raises(ValueError, match="empty"):
        Credentials(token="  ")
    with pytest.raises(ValueError, match="not both"):
        Credentials.from_files(token="a", token_file=pki.ca_cert)
    credentials = Credentials.from_files(cert_file=pki.client_cert, key_file=pki.client_key, token=TOKEN)
    assert credentials.tls
    assert TOKEN not in repr(credentials)
    assert "PRIVATE KEY" not in repr(credentials)
    assert credentials.metadata == (("authorization", f"Bearer {TOKEN}"),)
