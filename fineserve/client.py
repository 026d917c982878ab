"""A small typed Python client for the fineserve.v1 API, async and sync.

    from fineserve.client import FineserveClient

    async with FineserveClient("localhost:8001") as client:
        labels = await client.classify("fashion", [jpeg_bytes], top_k=3)
        sentiments = await client.analyze_sentiment("sentiment", ["a fine film"])

``SyncFineserveClient`` has the same methods without ``await``. Failures raise ``grpc.RpcError``
whose ``code()`` is the documented status (docs/serving.md) and ``details()`` the reason.

A server with TLS, mutual TLS or a bearer token (docs/reliability.md) is reached with
``Credentials``::

    credentials = Credentials.from_files(ca_file="ca.pem", token_file="/run/secrets/token")
    with SyncFineserveClient("fineserve.internal:8001", credentials=credentials) as client:
        ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import numpy as np

from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 30.0
Image = bytes | np.ndarray


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    index: int


@dataclass(frozen=True)
class Sentiment:
    label: str
    score: float
    scores: tuple[LabelScore, ...]


@dataclass(frozen=True)
class ModelVersion:
    version: int
    state: str
    execution_provider: str
    variant: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    labels: tuple[str, ...]
    versions: tuple[ModelVersion, ...]
    max_batch_size: int
    metadata_json: str


@dataclass(frozen=True, repr=False)
class Credentials:
    """What a client shows the server: TLS (with the CA to trust, and a certificate of its own for
    mutual TLS) and a bearer token, each optional. The token is sent as ``authorization: Bearer``
    metadata on every call, with or without TLS; without TLS it crosses the network in clear.
    """

    tls: bool = False
    # PEM CA bundle the server's certificate must chain to; None: the system's roots.
    root_certificates: bytes | None = None
    # Mutual TLS: the client's PEM certificate chain and private key.
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and the other way round")
        if not self.tls and (self.root_certificates or self.certificate_chain):
            raise ValueError("certificates are for TLS: set tls=True")
        if self.token is not None:
            if not self.token.strip():
                raise ValueError("the bearer token is empty")
            # A token read from a file or an environment variable often ends in a newline.
            object.__setattr__(self, "token", self.token.strip())

    def __repr__(self) -> str:  # never the token or the key
        return f"Credentials(tls={self.tls}, client_certificate={self.certificate_chain is not None})"

    @classmethod
    def from_files(
        cls,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        tls: bool | None = None,
    ) -> Credentials:
        """Reads PEM files and a token file (surrounding whitespace ignored). TLS is on when any
        certificate file is given, unless ``tls`` says otherwise."""
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        if token_file is not None:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        files = (ca_file, cert_file, key_file)
        return cls(
            tls=any(f is not None for f in files) if tls is None else tls,
            root_certificates=read(ca_file),
            certificate_chain=read(cert_file),
            private_key=read(key_file),
            token=token,
        )

    def channel(self, target: str, transport: Any = grpc) -> Any:
        """A channel to ``target`` over ``transport``: ``grpc`` (blocking) or ``grpc.aio``."""
        if not self.tls:
            return transport.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )
        return transport.secure_channel(target, credentials)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


# --- requests and replies: shared by both clients -----------------------------------------------


def classify_request(
    model: str, images: Sequence[Image], top_k: int, version: int | None
) -> pb.ClassifyRequest:
    """Encoded images as bytes, or ready float32 tensors (one image each, no batch axis)."""
    inputs = []
    for image in images:
        if isinstance(image, bytes):
            inputs.append(pb.ImageInput(encoded=image))
        else:
            array = np.ascontiguousarray(image, dtype="<f4")
            inputs.append(pb.ImageInput(tensor=pb.Tensor(shape=list(array.shape), fp32_data=array.tobytes())))
    return pb.ClassifyRequest(model=model, version=version or 0, images=inputs, top_k=top_k)


def _labels(message: Sequence[pb.LabelScore]) -> tuple[LabelScore, ...]:
    return tuple(LabelScore(s.label, s.score, s.index) for s in message)


def classifications(reply: pb.ClassifyResponse) -> list[tuple[LabelScore, ...]]:
    return [_labels(result.labels) for result in reply.results]


def sentiments(reply: pb.AnalyzeSentimentResponse) -> list[Sentiment]:
    return [Sentiment(r.label, r.score, _labels(r.scores)) for r in reply.results]


def model_infos(reply: pb.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name,
            task=m.task,
            labels=tuple(m.labels),
            versions=tuple(
                ModelVersion(v.version, v.state, v.execution_provider, v.variant) for v in m.versions
            ),
            max_batch_size=m.max_batch_size,
            metadata_json=m.metadata_json,
        )
        for m in reply.models
    ]


class _Client:
    """What both clients share: a channel to the server, the stub, and per-call options."""

    def __init__(self, target: str, transport: Any, timeout: float, credentials: Credentials | None) -> None:
        credentials = credentials or Credentials()
        self._channel = credentials.channel(target, transport)
        self._stub = pb_grpc.FineserveStub(self._channel)
        self._metadata = credentials.metadata
        self.timeout = timeout

    def _call_options(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "metadata": self._metadata}


class FineserveClient(_Client):
    """Async client (grpc.aio). Use as ``async with``, or call ``close()``."""

    def __init__(
        self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S, credentials: Credentials | None = None
    ) -> None:
        super().__init__(target, grpc.aio, timeout, credentials)

    async def classify(
        self, model: str, images: Sequence[Image], *, top_k: int = 5, version: int | None = None
    ) -> list[tuple[LabelScore, ...]]:
        """The top-k labels of each image, best first, in request order."""
        request = classify_request(model, images, top_k, version)
        return classifications(await self._stub.Classify(request, **self._call_options()))

    async def analyze_sentiment(
        self, model: str, texts: Sequence[str], *, version: int | None = None
    ) -> list[Sentiment]:
        request = pb.AnalyzeSentimentRequest(model=model, version=version or 0, texts=list(texts))
        return sentiments(await self._stub.AnalyzeSentiment(request, **self._call_options()))

    async def list_models(self) -> list[ModelInfo]:
        return model_infos(await self._stub.ListModels(pb.ListModelsRequest(), **self._call_options()))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class SyncFineserveClient(_Client):
    """Blocking client. Use as ``with``, or call ``close()``."""

    def __init__(
        self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S, credentials: Credentials | None = None
    ) -> None:
        super().__init__(target, grpc, timeout, credentials)

    def classify(
        self, model: str, images: Sequence[Image], *, top_k: int = 5, version: int | None = None
    ) -> list[tuple[LabelScore, ...]]:
        request = classify_request(model, images, top_k, version)
        return classifications(self._stub.Classify(request, **self._call_options()))

    def analyze_sentiment(
        self, model: str, texts: Sequence[str], *, version: int | None = None
    ) -> list[Sentiment]:
        request = pb.AnalyzeSentimentRequest(model=model, version=version or 0, texts=list(texts))
        return sentiments(self._stub.AnalyzeSentiment(request, **self._call_options()))

    def list_models(self) -> list[ModelInfo]:
        return model_infos(self._stub.ListModels(pb.ListModelsRequest(), **self._call_options()))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
