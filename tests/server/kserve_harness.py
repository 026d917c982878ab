"""Test harness for the KServe v2 service: the real server in a subprocess, tritonclient in another.

The server runs through the one process harness, ``fineserve.bench.server_process.ServerProcess``.

tritonclient ships its own compiled ``inference`` protos; our generated ``server.pb.inference``
registers the same symbols, and the two cannot live in one Python process (protobuf raises
"duplicate symbol"). The test process imports ours (through the server code and other tests),
so every tritonclient call runs in a spawned child: ``Triton`` submits the functions below to a
one-process pool. They import tritonclient lazily, so importing this module is harmless, and
they return plain data (numpy arrays, dicts, tuples), never tritonclient objects.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fineserve.bench.server_process import ServerProcess

# (name, datatype, array) for one input.
Input = tuple[str, str, np.ndarray]
_clients: dict[str, Any] = {}


class TritonError(Exception):
    """A failed call as tritonclient reported it: the gRPC status name and the server's message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Inferred:
    model_name: str
    model_version: str
    id: str
    outputs: dict[str, np.ndarray]


# --- run in the child -----------------------------------------------------------------------------


def _client(url: str) -> Any:
    import tritonclient.grpc as grpcclient

    if url not in _clients:
        _clients[url] = grpcclient.InferenceServerClient(url)
    return _clients[url]


def _error(err: Exception) -> tuple[str, str, str]:
    status = getattr(err, "status", lambda: None)() or "UNKNOWN"
    message = getattr(err, "message", lambda: str(err))() or ""
    return ("error", str(status).removeprefix("StatusCode."), message)


def _inputs(inputs: list[Input]) -> list[Any]:
    import tritonclient.grpc as grpcclient

    built = []
    for name, datatype, array in inputs:
        item = grpcclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        built.append(item)
    return built


def _outputs(names: list[str | tuple[str, int]] | None) -> list[Any] | None:
    """Output names, or (name, class_count) pairs for the classification extension."""
    import tritonclient.grpc as grpcclient

    if names is None:
        return None
    return [grpcclient.InferRequestedOutput(*((n,) if isinstance(n, str) else n)) for n in names]


def _inferred(result: Any) -> Inferred:
    response = result.get_response()
    return Inferred(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        outputs={o.name: result.as_numpy(o.name) for o in response.outputs},
    )


def call(url: str, method: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Any InferenceServerClient method; message results come back as JSON dicts."""
    try:
        return ("ok", getattr(_client(url), method)(*args, **kwargs))
    except Exception as err:
        return _error(err)


def infer(
    url: str, model: str, inputs: list[Input], outputs: list[str] | None, **kwargs: Any
) -> tuple[Any, ...]:
    try:
        result = _client(url).infer(model, _inputs(inputs), outputs=_outputs(outputs), **kwargs)
        return ("ok", _inferred(result))
    except Exception as err:
        return _error(err)


def stream(url: str, requests: list[dict[str, Any]], timeout_s: float) -> list[tuple[Any, ...]]:
    """Sends every request on one stream; returns one result per request, in arrival order."""
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def callback(result: Any, error: Any) -> None:
        answers.put(_error(error) if error is not None else ("ok", _inferred(result)))

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback)
    try:
        for r in requests:
            client.async_stream_infer(
                r["model"],
                _inputs(r["inputs"]),
                outputs=_outputs(r.get("outputs")),
                request_id=r.get("id", ""),
            )
        results = []
        end = time.monotonic() + timeout_s
        while len(results) < len(requests) and time.monotonic() < end:
            try:
                results.append(answers.get(timeout=0.1))
            except queue.Empty:
                continue
        return results
    finally:
        client.stop_stream()
        client.close()


def raw_infer(url: str, request: dict[str, Any], raw: list[bytes]) -> tuple[Any, ...]:
    """A hand-built ModelInferRequest (JSON form, plus raw contents) sent with tritonclient's own
    compiled stubs: for what tritonclient's API never sends (typed contents, inconsistent raw)."""
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    message = json_format.ParseDict(request, service_pb2.ModelInferRequest())
    message.raw_input_contents.extend(raw)
    with grpc.insecure_channel(url) as channel:
        try:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=30)
        except grpc.RpcError as err:
            return ("error", err.code().name, err.details())
    outputs = {
        o.name: (o.datatype, list(o.shape), r)
        for o, r in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return ("ok", outputs)


# (name, datatype, array, in_shared_memory) for one input of ``shm_infer``.
ShmInput = tuple[str, str, np.ndarray, bool]


def shm_infer(
    url: str,
    model: str,
    inputs: list[ShmInput],
    outputs: list[tuple[str, int]],
    prefix: str,
    *,
    region_offset: int = 0,
) -> tuple[Any, ...]:
    """One request passing tensors through system shared memory, as a tritonclient user writes it.

    The inputs marked for shared memory lie one after the other (BYTES serialized) in region
    ``{prefix}_in``; outputs given a byte size > 0 get that many bytes each, one after the other,
    in region ``{prefix}_out`` (byte size 0: returned in the response). Each region is registered
    at ``region_offset`` of its own object ``/{prefix}_in`` or ``/{prefix}_out``, and each tensor
    names its place in its region with ``shared_memory_offset``. The regions are unregistered and
    destroyed before this returns. The answer: the outputs as arrays (those in shared memory read
    from it), each output's parameters, its raw_output_contents length (None: no entry), and the
    server's status of every region while these were registered.
    """
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient import utils

    client = _client(url)
    handles: dict[str, Any] = {}
    registered: list[str] = []

    def region(role: str, contents: list[np.ndarray], byte_size: int) -> str:
        name = f"{prefix}_{role}"
        handles[role] = shm.create_shared_memory_region(name, f"/{name}", region_offset + byte_size)
        if contents:
            shm.set_shared_memory_region(handles[role], contents, offset=region_offset)
        client.register_system_shared_memory(name, f"/{name}", byte_size, offset=region_offset)
        registered.append(name)
        return name

    try:
        serialized = {
            name: utils.serialize_byte_tensor(array) if datatype == "BYTES" else np.ascontiguousarray(array)
            for name, datatype, array, placed in inputs
            if placed
        }
        sizes = {
            name: utils.serialized_byte_size(data) if data.dtype == np.object_ else data.nbytes
            for name, data in serialized.items()
        }
        built = []
        in_region = region("in", list(serialized.values()), sum(sizes.values())) if serialized else ""
        position = 0
        for name, datatype, array, placed in inputs:
            item = grpcclient.InferInput(name, list(array.shape), datatype)
            if placed:
                item.set_shared_memory(in_region, sizes[name], offset=position)
                position += sizes[name]
            else:
                item.set_data_from_numpy(array)
            built.append(item)
        places: dict[str, int] = {}
        position = 0
        for name, byte_size in outputs:
            if byte_size:
                places[name] = position
                position += byte_size
        out_region = region("out", [], position) if places else ""
        requested = []
        for name, byte_size in outputs:
            wanted = grpcclient.InferRequestedOutput(name)
            if byte_size:
                wanted.set_shared_memory(out_region, byte_size, offset=places[name])
            requested.append(wanted)
        status = client.get_system_shared_memory_status(as_json=True).get("regions", {})
        response = client.infer(model, built, outputs=requested).get_response()
        arrays: dict[str, np.ndarray] = {}
        parameters: dict[str, dict[str, Any]] = {}
        raw_sizes: dict[str, int | None] = {}
        raw = response.raw_output_contents
        for index, output in enumerate(response.outputs):
            parameters[output.name] = {
                key: getattr(value, value.WhichOneof("parameter_choice"))
                for key, value in output.parameters.items()
            }
            raw_sizes[output.name] = len(raw[index]) if index < len(raw) else None
            dtype = utils.triton_to_np_dtype(output.datatype)
            if output.name in places:
                view = shm.get_contents_as_numpy(
                    handles["out"], dtype, list(output.shape), offset=region_offset + places[output.name]
                )
                arrays[output.name] = view.copy()  # a view would keep the region from closing
                del view
            else:
                arrays[output.name] = np.frombuffer(raw[index], dtype).reshape(list(output.shape))
        answer = {"outputs": arrays, "parameters": parameters, "raw_sizes": raw_sizes, "status": status}
        return ("ok", answer)
    except Exception as err:
        return _error(err)
    finally:
        for name in registered:
            with contextlib.suppress(Exception):  # the server may be gone; the objects still go
                client.unregister_system_shared_memory(name)
        for handle in handles.values():
            shm.destroy_shared_memory_region(handle)


def descriptors() -> dict[str, bytes]:
    """tritonclient's compiled protos, as serialized FileDescriptorProtos."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    out = {}
    for module in (service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        out[module.DESCRIPTOR.name] = proto.SerializeToString()
    return out


# --- used in the test process ---------------------------------------------------------------------


class Triton:
    """A tritonclient living in a child process; methods raise TritonError on a failed call."""

    def __init__(self, url: str = "") -> None:
        self.url = url
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        return self._pool.submit(func, *args, **kwargs).result(timeout=60)

    @staticmethod
    def _unwrap(answer: tuple[Any, ...]) -> Any:
        if answer[0] == "error":
            raise TritonError(answer[1], answer[2])
        return answer[1]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._unwrap(self._run(call, self.url, method, *args, **kwargs))

    def infer(
        self, model: str, inputs: list[Input], outputs: list[str] | None = None, **kwargs: Any
    ) -> Inferred:
        answer: Inferred = self._unwrap(self._run(infer, self.url, model, inputs, outputs, **kwargs))
        return answer

    def stream(self, requests: list[dict[str, Any]], timeout_s: float = 30) -> list[Inferred | TritonError]:
        answers = self._run(stream, self.url, requests, timeout_s)
        return [a[1] if a[0] == "ok" else TritonError(a[1], a[2]) for a in answers]

    def raw_infer(self, request: dict[str, Any], raw: list[bytes] | None = None) -> dict[str, Any]:
        return self._unwrap(self._run(raw_infer, self.url, request, raw or []))  # type: ignore[no-any-return]

    def shm_infer(
        self,
        model: str,
        inputs: list[ShmInput],
        outputs: list[tuple[str, int]],
        prefix: str,
        *,
        region_offset: int = 0,
    ) -> dict[str, Any]:
        answer = self._run(shm_infer, self.url, model, inputs, outputs, prefix, region_offset=region_offset)
        return self._unwrap(answer)  # type: ignore[no-any-return]

    def descriptors(self) -> dict[str, bytes]:
        found: dict[str, bytes] = self._run(descriptors)
        return found

    def wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            answer = self._run(call, self.url, "is_server_ready", client_timeout=2)
            if answer == ("ok", True):
                return
            time.sleep(0.2)
        raise TimeoutError(f"server at {self.url} not ready after {timeout_s} s")


# --- the server under test ------------------------------------------------------------------------


@contextmanager
def connected(server: ServerProcess, timeout_s: float = 60) -> Iterator[Triton]:
    """A tritonclient for ``server``, once it is ready; its log is in the error if it never is."""
    client = Triton(server.url)
    try:
        try:
            client.wait_ready(timeout_s)
        except TimeoutError:
            raise AssertionError("server not ready; its log:\n" + server.log_tail()) from None
        yield client
    finally:
        client.close()


@contextmanager
def running_server(
    repository: Path, *flags: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> Iterator[ServerProcess]:
    """``python -m fineserve.server`` through the one process harness (``fineserve.bench.server_process``)
    on a port it picks, without metrics or repository polling unless ``flags`` say otherwise; it
    yields once the server listens and stops it with SIGTERM at the end."""
    quiet = ["--metrics-port", "-1", "--repository-poll-s", "0"]
    with ServerProcess(repository, [*quiet, *flags], env=env) as server:
        server.start(timeout_s, until="listening")
        yield server
