"""Who may call: TLS and mutual TLS with real certificates, bearer tokens for inference and for model
management, bind addresses, message size limits, and no unpickling anywhere in the sources."""

from __future__ import annotations

import ast
import asyncio
import collections
import logging
import multiprocessing
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fineserve.server import security, shutdown
from fineserve.server.config import SettingsError, load_settings
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as fs
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as fs_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.fixtures import MakeObject, publish_tiny_models
from tests.reliability import images
from tests.reliability.certs import Pki, make_pki
from tests.reliability.triton_child import infer_text_over_tls
from tests.server.running import RunningServer, code_of

INFERENCE_TOKEN = "inference-s3cret-0123456789"
ADMIN_TOKEN = "admin-s3cret-9876543210"
PNG = images.png(images.rgb_pixels())
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_models(tmp_path_factory.mktemp("security") / "models")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def serve(repository: Path, **settings: Any) -> RunningServer:
    return RunningServer(repository, repository_poll_s=0, **settings)


def classify(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> fs.ClassifyResponse:
    request = fs.ClassifyRequest(model="tiny-image", images=[fs.ImageInput(encoded=PNG)])
    return fs_grpc.FineserveStub(channel).Classify(request, timeout=10, metadata=metadata)


def credentials(
    pki: Pki, ca: Path | None = None, client: tuple[Path, Path] | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca_cert).read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )


# --- TLS -----------------------------------------------------------------------------------------


def test_tls_serves_trusting_clients_only(repository: Path, pki: Pki) -> None:
    with serve(repository, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key) as server:
        with grpc.secure_channel(server.target, credentials(pki)) as channel:
            assert classify(channel).results[0].labels
        with grpc.insecure_channel(server.target) as plain:
            assert code_of(lambda: classify(plain)) == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses the server's certificate.
        with grpc.secure_channel(server.target, credentials(pki, ca=pki.stranger_cert)) as wary:
            assert code_of(lambda: classify(wary)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(repository: Path, pki: Pki) -> None:
    tls = {
        "tls_cert_file": pki.server_cert,
        "tls_key_file": pki.server_key,
        "tls_client_ca_file": pki.ca_cert,
        "tls_require_client_cert": True,
    }
    with serve(repository, **tls) as server:
        client = (pki.client_cert, pki.client_key)
        with grpc.secure_channel(server.target, credentials(pki, client=client)) as channel:
            assert classify(channel).results[0].labels
        with grpc.secure_channel(server.target, credentials(pki)) as anonymous:
            assert code_of(lambda: classify(anonymous)) == grpc.StatusCode.UNAVAILABLE
        stranger = (pki.stranger_cert, pki.stranger_key)
        with grpc.secure_channel(server.target, credentials(pki, client=stranger)) as channel:
            assert code_of(lambda: classify(channel)) == grpc.StatusCode.UNAVAILABLE


# --- tokens --------------------------------------------------------------------------------------


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def guarded(repository: Path) -> Iterator[grpc.Channel]:
    """A server with both tokens, and a channel without credentials of its own."""
    with (
        serve(repository, inference_token=INFERENCE_TOKEN, admin_token=ADMIN_TOKEN) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        yield channel


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ((), UNAUTHENTICATED, "missing bearer token"),
        (bearer("wrong"), UNAUTHENTICATED, "invalid bearer token"),
        (bearer(INFERENCE_TOKEN[:-1]), UNAUTHENTICATED, "invalid bearer token"),
        (bearer(ADMIN_TOKEN), UNAUTHENTICATED, "invalid bearer token"),
        ((("authorization", INFERENCE_TOKEN),), UNAUTHENTICATED, "missing bearer token"),
        (bearer(INFERENCE_TOKEN), grpc.StatusCode.OK, ""),
        ((("authorization", f"bearer {INFERENCE_TOKEN}"),), grpc.StatusCode.OK, ""),
    ],
    ids=["none", "wrong", "prefix", "admin-for-inference", "no-scheme", "right", "lowercase-scheme"],
)
def test_inference_needs_the_inference_token(
    guarded: grpc.Channel, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode, message: str
) -> None:
    try:
        classify(guarded, metadata)
        got, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        got, details = err.code(), err.details()
    assert got == code
    assert message in details
    assert INFERENCE_TOKEN not in details and ADMIN_TOKEN not in details


def test_every_inference_and_metadata_rpc_is_guarded(guarded: grpc.Channel) -> None:
    kserve = ks_grpc.GRPCInferenceServiceStub(guarded)
    infer = ks.ModelInferRequest(model_name="tiny-text")
    infer.inputs.add(name="texts", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"good")
    calls = {
        "ListModels": lambda m: fs_grpc.FineserveStub(guarded).ListModels(fs.ListModelsRequest(), metadata=m),
        "ModelInfer": lambda m: kserve.ModelInfer(infer, metadata=m, timeout=10),
        "ModelStreamInfer": lambda m: list(kserve.ModelStreamInfer(iter([infer]), metadata=m, timeout=10)),
        "ModelMetadata": lambda m: kserve.ModelMetadata(
            ks.ModelMetadataRequest(name="tiny-text"), metadata=m
        ),
        "RepositoryIndex": lambda m: kserve.RepositoryIndex(ks.RepositoryIndexRequest(), metadata=m),
        "ModelStatistics": lambda m: kserve.ModelStatistics(ks.ModelStatisticsRequest(), metadata=m),
    }
    for name, call in calls.items():
        assert code_of(lambda call=call: call(())) == UNAUTHENTICATED, name
        assert code_of(lambda call=call: call(bearer(INFERENCE_TOKEN))) == grpc.StatusCode.OK, name


def test_health_reflection_and_kserve_liveness_stay_open(guarded: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(guarded).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    kserve = ks_grpc.GRPCInferenceServiceStub(guarded)
    assert kserve.ServerLive(ks.ServerLiveRequest(), timeout=5).live
    assert kserve.ServerReady(ks.ServerReadyRequest(), timeout=5).ready
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answer = next(reflection_pb2_grpc.ServerReflectionStub(guarded).ServerReflectionInfo(iter([request])))
    assert "fineserve.v1.Fineserve" in {s.name for s in answer.list_services_response.service}


def test_model_management_needs_the_admin_token(guarded: grpc.Channel) -> None:
    kserve = ks_grpc.GRPCInferenceServiceStub(guarded)
    unload = ks.RepositoryModelUnloadRequest(model_name="tiny-text")
    load = ks.RepositoryModelLoadRequest(model_name="tiny-text")
    for metadata in [(), bearer(INFERENCE_TOKEN), bearer("nope")]:
        assert code_of(lambda m=metadata: kserve.RepositoryModelUnload(unload, metadata=m)) == UNAUTHENTICATED
    kserve.RepositoryModelUnload(unload, metadata=bearer(ADMIN_TOKEN), timeout=30)
    assert not kserve.ModelReady(
        ks.ModelReadyRequest(name="tiny-text"), metadata=bearer(INFERENCE_TOKEN)
    ).ready
    assert (
        code_of(lambda: kserve.RepositoryModelLoad(load, metadata=bearer(INFERENCE_TOKEN))) == UNAUTHENTICATED
    )
    kserve.RepositoryModelLoad(load, metadata=bearer(ADMIN_TOKEN), timeout=30)
    assert kserve.ModelReady(ks.ModelReadyRequest(name="tiny-text"), metadata=bearer(INFERENCE_TOKEN)).ready


def test_shared_memory_registration_needs_the_admin_token(repository: Path, shm_objects: MakeObject) -> None:
    """Registering, listing and unregistering regions (system and CUDA) is management: the
    inference token is refused before any handler runs, the admin token gets through. A region
    the admin registered is then named by inference calls with the inference token."""
    key, memory = shm_objects(3 * 8 * 8 * 4 + 64)
    with (
        serve(
            repository,
            inference_token=INFERENCE_TOKEN,
            admin_token=ADMIN_TOKEN,
            system_shared_memory=True,
            cuda_shared_memory=True,
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        kserve = ks_grpc.GRPCInferenceServiceStub(channel)
        register = ks.SystemSharedMemoryRegisterRequest(name="pixels", key=key, byte_size=3 * 8 * 8 * 4)
        cuda_register = ks.CudaSharedMemoryRegisterRequest(name="gpu", raw_handle=bytes(64), byte_size=64)
        calls: dict[str, Any] = {
            "SystemSharedMemoryRegister": lambda m: kserve.SystemSharedMemoryRegister(register, metadata=m),
            "SystemSharedMemoryStatus": lambda m: kserve.SystemSharedMemoryStatus(
                ks.SystemSharedMemoryStatusRequest(), metadata=m
            ),
            "SystemSharedMemoryUnregister": lambda m: kserve.SystemSharedMemoryUnregister(
                ks.SystemSharedMemoryUnregisterRequest(), metadata=m
            ),
            "CudaSharedMemoryRegister": lambda m: kserve.CudaSharedMemoryRegister(cuda_register, metadata=m),
            "CudaSharedMemoryStatus": lambda m: kserve.CudaSharedMemoryStatus(
                ks.CudaSharedMemoryStatusRequest(), metadata=m
            ),
            "CudaSharedMemoryUnregister": lambda m: kserve.CudaSharedMemoryUnregister(
                ks.CudaSharedMemoryUnregisterRequest(), metadata=m
            ),
        }
        for name, call in calls.items():
            for metadata in [(), bearer(INFERENCE_TOKEN)]:
                assert code_of(lambda c=call, m=metadata: c(m)) == UNAUTHENTICATED, name
        # Nothing was registered by those calls; the admin token registers.
        assert not kserve.SystemSharedMemoryStatus(
            ks.SystemSharedMemoryStatusRequest(), metadata=bearer(ADMIN_TOKEN)
        ).regions
        calls["SystemSharedMemoryRegister"](bearer(ADMIN_TOKEN))
        status = kserve.SystemSharedMemoryStatus(
            ks.SystemSharedMemoryStatusRequest(), metadata=bearer(ADMIN_TOKEN)
        )
        assert list(status.regions) == ["pixels"]
        # Past the token check, CUDA registration meets this host: no CUDA device here.
        assert code_of(lambda: calls["CudaSharedMemoryRegister"](bearer(ADMIN_TOKEN))) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        assert not calls["CudaSharedMemoryStatus"](bearer(ADMIN_TOKEN)).regions
        # An inference call names the region with the inference token.
        memory[: 3 * 8 * 8 * 4] = np.ones((1, 3, 8, 8), "<f4").tobytes()
        infer = ks.ModelInferRequest(model_name="tiny-image")
        pixels = infer.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 3, 8, 8])
        pixels.parameters["shared_memory_region"].string_param = "pixels"
        pixels.parameters["shared_memory_byte_size"].int64_param = 3 * 8 * 8 * 4
        reply = kserve.ModelInfer(infer, metadata=bearer(INFERENCE_TOKEN), timeout=30)
        assert reply.outputs and reply.raw_output_contents[0]
        # Unregistering everything (name "") is the admin's alone too.
        assert (
            code_of(lambda: calls["SystemSharedMemoryUnregister"](bearer(INFERENCE_TOKEN))) == UNAUTHENTICATED
        )
        calls["SystemSharedMemoryUnregister"](bearer(ADMIN_TOKEN))
        calls["CudaSharedMemoryUnregister"](bearer(ADMIN_TOKEN))
        assert not calls["SystemSharedMemoryStatus"](bearer(ADMIN_TOKEN)).regions


def test_with_only_an_inference_token_management_needs_it_too(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {INFERENCE_TOKEN}\n")
    caplog.set_level(logging.DEBUG)
    with (
        serve(repository, inference_token_file=token_file) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        kserve = ks_grpc.GRPCInferenceServiceStub(ch)
        unload = ks.RepositoryModelUnloadRequest(model_name="no-such-model")
        assert code_of(lambda: kserve.RepositoryModelUnload(unload)) == UNAUTHENTICATED
        # Past the token check: the model does not exist.
        assert code_of(lambda: kserve.RepositoryModelUnload(unload, metadata=bearer(INFERENCE_TOKEN))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert classify(ch, bearer(INFERENCE_TOKEN)).results
        assert code_of(lambda: classify(ch, bearer("guess"))) == UNAUTHENTICATED
        assert INFERENCE_TOKEN not in repr(server.settings)
    assert "refused 1 unauthenticated call" in caplog.text
    assert "management as inference (token)" in caplog.text
    assert INFERENCE_TOKEN not in caplog.text


def test_tokens_never_reach_settings_reprs(repository: Path) -> None:
    settings = load_settings(
        model_repository=repository, inference_token=INFERENCE_TOKEN, admin_token=ADMIN_TOKEN
    )
    assert INFERENCE_TOKEN not in repr(settings) and ADMIN_TOKEN not in str(settings)
    assert security.Tokens.from_settings(settings).describe() == (
        "inference token, management admin token, health and reflection open"
    )


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"tls_cert_file": "{cert}"}, "tls_cert_file and tls_key_file go together"),
        ({"tls_key_file": "{key}"}, "tls_cert_file and tls_key_file go together"),
        ({"tls_client_ca_file": "{ca}"}, "tls_client_ca_file needs TLS"),
        (
            {"tls_cert_file": "{cert}", "tls_key_file": "{key}", "tls_require_client_cert": True},
            "needs tls_client_ca",
        ),
        ({"tls_cert_file": "{missing}", "tls_key_file": "{key}"}, "tls_cert_file: .* is not a readable file"),
        ({"inference_token": "x", "inference_token_file": "{cert}"}, "not both"),
        ({"admin_token": "   "}, "admin_token is empty"),
        ({"admin_token_file": "{empty}"}, "admin_token_file: .* is empty"),
    ],
)
def test_security_settings_are_checked_at_startup(
    settings: dict[str, Any], problem: str, pki: Pki, tmp_path: Path
) -> None:
    (tmp_path / "empty").write_text("\n")
    paths = {
        "cert": pki.server_cert,
        "key": pki.server_key,
        "ca": pki.ca_cert,
        "missing": tmp_path / "nope.pem",
        "empty": tmp_path / "empty",
    }
    given = {k: v.format(**paths) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(SettingsError, match=problem):
        load_settings(**given)


# --- bind addresses and message sizes ------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Addresses of the listening TCP sockets on ``port`` (from /proc/net/tcp and tcp6), as text;
    IPv4-mapped IPv6 addresses as their IPv4 form."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            # The kernel writes each 32-bit word in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            text = socket.inet_ntop(family, raw)
            found.add(text.removeprefix("::ffff:"))
    return found


def test_bind_addresses_and_message_sizes_are_what_the_settings_say(repository: Path) -> None:
    with serve(
        repository, grpc_host="127.0.0.1", metrics_host="127.0.0.1", max_send_message_bytes=1024
    ) as server:
        assert listening_addresses(server.server.grpc_port) == {"127.0.0.1"}
        assert server.server.metrics_port is not None
        assert listening_addresses(server.server.metrics_port) == {"127.0.0.1"}
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        assert urllib.request.urlopen(url, timeout=10).status == 200
        with grpc.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel:
            assert classify(channel).results  # a small answer fits
            # The model list with its metadata is larger than 1024 bytes: gRPC refuses to send it.
            stub = fs_grpc.FineserveStub(channel)
            try:
                stub.ListModels(fs.ListModelsRequest(), timeout=10)
                raise AssertionError("an answer over max_send_message_bytes was sent")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "larger than max" in (err.details() or "")


# --- nothing is ever unpickled -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
SKIPPED = {".venv", ".git", "node_modules", "build", "dist", ".mypy_cache", ".ruff_cache"}
PICKLE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("cloudpickle", "load"),
                  ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
                  ("_pickle", "load"), ("pickle", "Unpickler")}  # fmt: skip


def python_sources() -> list[Path]:
    return [path for path in ROOT.rglob("*.py") if not SKIPPED & set(path.relative_to(ROOT).parts[:-1])]


def dotted(node: ast.expr) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


def test_nothing_in_the_sources_unpickles() -> None:
    """Every torch.load passes weights_only=True; no pickle/joblib loaders; no allow_pickle=True."""
    sources = python_sources()
    assert len(sources) > 50
    problems = []
    torch_loads = 0
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in (
                "pickle",
                "dill",
                "cloudpickle",
                "joblib",
            ):
                names = {alias.name for alias in node.names}
                if names & {"load", "loads", "Unpickler"}:
                    problems.append(f"{path}:{node.lineno}: from {node.module} import {sorted(names)}")
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            name = dotted(node.func)
            if name == ("torch", "load"):
                torch_loads += 1
                if not keyword_is_true(node, "weights_only"):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in PICKLE_LOADERS:
                problems.append(f"{where}: {'.'.join(name)}")
            elif name is not None and name[1] == "load" and keyword_is_true(node, "allow_pickle"):
                problems.append(f"{where}: {'.'.join(name)}(allow_pickle=True)")
    assert torch_loads > 0  # the scan does see the training code's checkpoint loading
    assert not problems, "\n".join(problems)


# --- the rules, without a server -------------------------------------------------------------------


def test_which_methods_need_which_token() -> None:
    tokens = security.Tokens(inference=None, admin=b"a")
    assert tokens.required(security.access_of("/inference.GRPCInferenceService/RepositoryModelLoad")) == b"a"
    assert tokens.required(security.access_of("/inference.GRPCInferenceService/ModelInfer")) is None
    both = security.Tokens(inference=b"i", admin=b"a")
    assert both.required(security.access_of("/fineserve.v1.Fineserve/Classify")) == b"i"
    assert both.required(security.access_of("/inference.GRPCInferenceService/RepositoryIndex")) == b"i"
    assert both.required(security.access_of("/grpc.health.v1.Health/Watch")) is None
    assert (
        both.required(security.access_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")) is None
    )
    assert both.required(security.access_of("/inference.GRPCInferenceService/ServerLive")) is None
    assert security.Tokens(inference=b"i", admin=None).required(security.Access.MANAGEMENT) == b"i"
    for rpc in ("SystemSharedMemoryRegister", "CudaSharedMemoryStatus", "SystemSharedMemoryUnregister"):
        assert security.access_of(f"/inference.GRPCInferenceService/{rpc}") is security.Access.MANAGEMENT, rpc


def test_bearer_tokens_are_read_from_metadata_only_with_the_bearer_scheme() -> None:
    assert security.presented_token((("Authorization", "Bearer  tok "),)) == b"tok"
    assert security.presented_token((("authorization", "BEARER tok"),)) == b"tok"
    assert security.presented_token((("authorization", "Basic dG9r"),)) is None
    assert security.presented_token((("x-token", "Bearer tok"),)) is None
    assert security.presented_token(None) is None


def test_tritonclient_speaks_mutual_tls_with_a_token(repository: Path, pki: Pki) -> None:
    secured = {
        "tls_cert_file": pki.server_cert,
        "tls_key_file": pki.server_key,
        "tls_client_ca_file": pki.ca_cert,
        "tls_require_client_cert": True,
        "inference_token": INFERENCE_TOKEN,
    }
    files = (str(pki.ca_cert), str(pki.client_cert), str(pki.client_key))
    with (
        serve(repository, **secured) as server,
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child,
    ):
        answer = child.submit(infer_text_over_tls, server.target, *files, INFERENCE_TOKEN).result(60)
        refused = child.submit(infer_text_over_tls, server.target, *files, None).result(60)
    assert answer[0] == "ok" and answer[1][0][1] > 0.5, answer  # "a good movie" is positive
    assert refused[:2] == ("error", "UNAUTHENTICATED"), refused


def test_refused_calls_are_counted_by_method_and_code(repository: Path) -> None:
    with (
        serve(repository, inference_token=INFERENCE_TOKEN, metrics_port=0) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        for metadata in ((), (), bearer("wrong")):
            assert code_of(lambda m=metadata: classify(channel, m)) == UNAUTHENTICATED
        assert classify(channel, bearer(INFERENCE_TOKEN)).results  # not counted as refused
        # Past the token check, bytes that are not a ClassifyRequest: refused, and counted.
        garbage = channel.unary_unary("/fineserve.v1.Fineserve/Classify", request_serializer=None)
        with pytest.raises(grpc.RpcError) as failed:
            garbage(b"\xff" * 12, timeout=10, metadata=bearer(INFERENCE_TOKEN))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        url = f"http://localhost:{server.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    prefix = "fineserve_refused_calls_total{"
    refused = sorted(line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix))
    assert refused == [
        'code="INVALID_ARGUMENT",method="/fineserve.v1.Fineserve/Classify"} 1.0',
        'code="UNAUTHENTICATED",method="/fineserve.v1.Fineserve/Classify"} 3.0',
    ]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [((), "UNAUTHENTICATED"), (bearer(INFERENCE_TOKEN), "UNAVAILABLE")],
    ids=["bad-token", "good-token"],
)
def test_a_call_refused_while_shutting_down_is_counted_once_as_answered(
    metadata: tuple[tuple[str, str], ...], expected: str
) -> None:
    """The interceptors in the server's order (auth, then the shutdown gate): each refusal is
    counted when it is the answer, so one call is never counted by both."""
    counted: list[tuple[str, str]] = []
    gate = shutdown.ShutdownGate(on_refused=lambda method, code: counted.append((method, code)))
    gate.close()
    tokens = security.Tokens(inference=INFERENCE_TOKEN.encode(), admin=None)
    auth = security.AuthInterceptor(tokens, on_refused=lambda method, code: counted.append((method, code)))
    method = "/fineserve.v1.Fineserve/Classify"
    details = collections.namedtuple("Details", "method invocation_metadata")(method, metadata)

    async def handler_of(_: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(lambda request, context: None)

    async def through_gate(call_details: Any) -> grpc.RpcMethodHandler:
        return await gate.intercept_service(handler_of, call_details)

    class Aborted(Exception):
        pass

    class Context:
        async def abort(self, code: grpc.StatusCode, message: str) -> None:
            raise Aborted(code.name)

    async def call() -> str:
        handler = await auth.intercept_service(through_gate, details)
        with pytest.raises(Aborted) as aborted:
            # Refusals are request-streaming whatever the method (server/refusal.py).
            await handler.stream_unary(iter(()), Context())
        return str(aborted.value)

    assert asyncio.run(call()) == expected
    assert counted == [(method, expected)]
