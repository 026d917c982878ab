"""A bounded async gRPC load generator for a running fineserve (loopback only).

    fineserve bench load --target 127.0.0.1:8001 --model-dir models/fashion/1 \
        --protocol kserve --kind tensor --concurrency 32 --items 1 --seconds 10

Each of ``--concurrency`` workers sends one request at a time for ``--seconds``; the report gives
throughput (items/s), latency percentiles and errors by gRPC status code. The request is built
and serialized once and its bytes sent again and again, so the client spends its time in gRPC,
not in making inputs: the load generator shares the machine's cores with the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc

from fineserve.bench.inputs import encoded_items, tensor_batch
from fineserve.bench.stats import latency_summary, write_json
from fineserve.export.contract import ModelSpec, read_model_spec
from fineserve.server.kserve.regions import SHM_BYTE_SIZE, SHM_OFFSET, SHM_REGION
from fineserve.server.pb.fineserve.v1 import fineserve_pb2
from fineserve.server.pb.inference import grpc_service_pb2, grpc_service_pb2_grpc

DATATYPES = {"float32": "FP32", "int64": "INT64"}
LOOPBACK = ("127.", "localhost", "[::1]")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


@dataclass(frozen=True)
class Load:
    """One load point: what is sent, how many at a time, for how long."""

    protocol: str = "kserve"  # kserve | fineserve
    kind: str = "tensor"  # tensor (ready tensors / token ids) | bytes (encoded images / texts)
    concurrency: int = 8
    items: int = 1
    seconds: float = 10.0
    warmup_s: float = 0.0  # sent but not counted: lets batch sizes settle
    seq_len: int = 64
    image_side: int = 480
    timeout: float = 10.0
    bytes_input: str | None = None
    # The model's version folder: text models then get real token ids from its tokenizer.
    version_dir: Path | None = None
    # KServe only: the inputs lie in one system shared memory region (registered for the run) that
    # the server copies them from, and the request carries only their place, not their bytes.
    shared_memory: bool = False
    # TCP connections the requests are spread over (round robin): a server with --workers N hands
    # each connection to one worker, so one connection loads one worker only.
    connections: int = 1


def kserve_request(spec: ModelSpec, load: Load) -> Any:
    request = grpc_service_pb2.ModelInferRequest(model_name=spec.name)
    if load.kind == "tensor":
        for name, array in tensor_batch(spec, load.items, load.seq_len, version_dir=load.version_dir).items():
            request.inputs.add(name=name, datatype=DATATYPES[str(array.dtype)], shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
    else:
        items = encoded_items(spec, load.items, load.image_side)
        payload = b"".join(struct.pack("<I", len(item)) + item for item in items)
        bytes_input = load.bytes_input or ("images" if spec.image is not None else "texts")
        request.inputs.add(name=bytes_input, datatype="BYTES", shape=[load.items])
        request.raw_input_contents.append(payload)
    return request


class InputRegion:
    """The request's inputs in a POSIX shared-memory object, registered with the server for one
    run: the request then names the region instead of carrying the tensors (KServe's system
    shared memory; the server must run with ``--system-shared-memory``)."""

    def __init__(self, request: Any) -> None:
        self.name = f"fineserve-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        raws = list(request.raw_input_contents)
        self._memory = shared_memory.SharedMemory(create=True, size=max(1, sum(len(r) for r in raws)))
        self.request = grpc_service_pb2.ModelInferRequest()
        self.request.CopyFrom(request)
        del self.request.raw_input_contents[:]
        buffer = self._memory.buf
        assert buffer is not None  # open until close()
        offset = 0
        for tensor, raw in zip(self.request.inputs, raws, strict=True):
            buffer[offset : offset + len(raw)] = raw
            tensor.parameters[SHM_REGION].string_param = self.name
            tensor.parameters[SHM_BYTE_SIZE].int64_param = len(raw)
            tensor.parameters[SHM_OFFSET].int64_param = offset
            offset += len(raw)

    async def register(self, channel: grpc.aio.Channel) -> None:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        size = self._memory.size
        await stub.SystemSharedMemoryRegister(
            grpc_service_pb2.SystemSharedMemoryRegisterRequest(
                name=self.name, key=f"/{self._memory.name}", offset=0, byte_size=size
            ),
            timeout=30,
        )

    async def unregister(self, channel: grpc.aio.Channel) -> None:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.SystemSharedMemoryUnregister(
                grpc_service_pb2.SystemSharedMemoryUnregisterRequest(name=self.name), timeout=30
            )

    def close(self) -> None:
        self._memory.close()
        self._memory.unlink()


def _method(channel: grpc.aio.Channel, service: Any, name: str, *, stream: bool = False) -> Any:
    """A method of ``service`` that takes requests already serialized (bytes) and answers parsed
    messages: the request is serialized once, not on every call."""
    response_class = _RESPONSE_CLASSES[service.methods_by_name[name].output_type.full_name]
    path = f"/{service.full_name}/{name}"
    make = channel.stream_stream if stream else channel.unary_unary
    return make(path, request_serializer=None, response_deserializer=response_class.FromString)


_RESPONSE_CLASSES: dict[str, Any] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        grpc_service_pb2.ModelInferResponse,
        grpc_service_pb2.ModelStreamInferResponse,
        fineserve_pb2.ClassifyResponse,
        fineserve_pb2.AnalyzeSentimentResponse,
    )
}
KSERVE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
FINESERVE = fineserve_pb2.DESCRIPTOR.services_by_name["Fineserve"]


def fineserve_call(channel: grpc.aio.Channel, spec: ModelSpec, load: Load) -> tuple[Any, Any]:
    if spec.text is not None:
        texts = [item.decode() for item in encoded_items(spec, load.items)]
        request = fineserve_pb2.AnalyzeSentimentRequest(model=spec.name, texts=texts)
        return _method(channel, FINESERVE, "AnalyzeSentiment"), request
    if load.kind == "tensor":
        (array,) = tensor_batch(spec, load.items).values()
        images = [
            fineserve_pb2.ImageInput(tensor=fineserve_pb2.Tensor(shape=list(a.shape), fp32_data=a.tobytes()))
            for a in array
        ]
    else:
        encoded = encoded_items(spec, load.items, load.image_side)
        images = [fineserve_pb2.ImageInput(encoded=item) for item in encoded]
    request = fineserve_pb2.ClassifyRequest(model=spec.name, images=images, top_k=1)
    return _method(channel, FINESERVE, "Classify"), request


class StreamCaller:
    """One KServe ``ModelStreamInfer`` stream used like a unary method: write a request, read its
    answer. Each worker keeps its own stream open, so calls after the first cost one message each
    way instead of a whole gRPC call."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call = _method(channel, KSERVE, "ModelStreamInfer", stream=True)()

    async def __call__(self, request: Any, timeout: float) -> Any:
        await self._call.write(request)
        try:
            response = await asyncio.wait_for(self._call.read(), timeout)
        except TimeoutError:
            raise StreamFailed("DEADLINE_EXCEEDED") from None
        if response is grpc.aio.EOF:
            raise StreamFailed("STREAM_CLOSED")
        if response.error_message:  # errors come in band; the stream goes on
            raise StreamFailed("IN_BAND_ERROR")
        return response

    async def close(self) -> None:
        await self._call.done_writing()
        self._call.cancel()


class StreamFailed(Exception):
    """A streamed request failed; ``args[0]`` names how (counted like a status code)."""


async def run_load(
    target: str, spec: ModelSpec, load: Load, on_window: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Drives one load point; raises ``grpc.aio.AioRpcError`` if the very first call fails.

    ``on_window`` is called when the measured window opens, after the warmup: where a caller
    snapshots CPU counters, so the warmup's work is not charged to the measured requests.
    """
    # Channels to one address share one connection unless each has a subchannel pool of its own.
    options = CHANNEL_OPTIONS + ([("grpc.use_local_subchannel_pool", 1)] if load.connections > 1 else [])
    async with contextlib.AsyncExitStack() as stack:
        callers = []
        for _ in range(load.connections):
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target, options=options))
            message: Any
            if load.protocol in ("kserve", "kserve-stream"):
                method: Any = _method(channel, KSERVE, "ModelInfer")
                message = kserve_request(spec, load)
                if load.shared_memory:
                    # A region per connection: each may reach another worker, which registers its own.
                    region = InputRegion(message)
                    stack.callback(region.close)
                    await region.register(channel)
                    stack.push_async_callback(region.unregister, channel)
                    message = region.request
            else:
                method, message = fineserve_call(channel, spec, load)
            callers.append(_Caller(channel, method, message.SerializeToString()))
        return await _drive(callers, load, on_window)


@dataclass(frozen=True)
class _Caller:
    """One connection's method and serialized request."""

    channel: grpc.aio.Channel
    method: Any
    request: bytes


def run_load_with_server_cpu(
    target: str, spec: ModelSpec, load: Load, cpu_seconds: Callable[[], float]
) -> dict[str, Any]:
    """``run_load`` plus the server's CPU per answered request (``server_cpu_us_per_request``),
    from ``cpu_seconds`` (the server's process CPU so far) read when the measured window opens
    and when the load ends."""
    start: dict[str, float] = {}

    def open_window() -> None:
        start["cpu"] = cpu_seconds()

    row = asyncio.run(run_load(target, spec, load, on_window=open_window))
    answered = row["requests_ok"] or 1
    row["server_cpu_us_per_request"] = (cpu_seconds() - start["cpu"]) * 1e6 / answered
    return row


async def _drive(
    callers: list[_Caller],
    load: Load,
    on_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    for caller in callers:
        await caller.method(caller.request, timeout=30)  # one call first: fail fast on a wrong setup
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    counting_from = time.perf_counter() + load.warmup_s
    end = counting_from + load.seconds

    async def open_window() -> None:
        await asyncio.sleep(max(0.0, counting_from - time.perf_counter()))
        if on_window is not None:
            on_window()

    async def worker(caller: _Caller) -> None:
        request = caller.request
        stream = StreamCaller(caller.channel) if load.protocol == "kserve-stream" else None
        call = stream or caller.method
        while (start := time.perf_counter()) < end:
            try:
                await call(request, timeout=load.timeout)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            except StreamFailed as err:
                code = str(err.args[0])
            if start >= counting_from:  # only requests sent inside the measured window
                codes[code] += 1
                if code == "OK":
                    latencies.append(time.perf_counter() - start)
            if code in ("DEADLINE_EXCEEDED", "STREAM_CLOSED") and stream is not None:
                break  # the stream's state is unknown: this worker stops
        if stream is not None:
            await stream.close()

    await asyncio.gather(open_window(), *(worker(callers[i % len(callers)]) for i in range(load.concurrency)))
    # The last requests may finish after `end`: the window is until the last answer.
    elapsed = time.perf_counter() - counting_from
    return {
        "protocol": load.protocol,
        "kind": load.kind,
        "shared_memory": load.shared_memory,
        "concurrency": load.concurrency,
        "connections": len(callers),
        "items_per_request": load.items,
        "seconds": elapsed,
        "requests_ok": codes["OK"],
        "items_per_s": codes["OK"] * load.items / elapsed,
        "codes": dict(codes),
        **latency_summary(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench load", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:8001", help="server address (loopback only)")
    parser.add_argument("--model-dir", type=Path, required=True, help="the served version folder (shapes)")
    parser.add_argument(
        "--protocol",
        choices=["kserve", "kserve-stream", "fineserve"],
        default="kserve",
        help="KServe unary ModelInfer, KServe ModelStreamInfer (one stream per worker), or fineserve.v1",
    )
    parser.add_argument(
        "--kind",
        choices=["tensor", "bytes"],
        default="tensor",
        help="ready tensors, or encoded images / texts the server preprocesses",
    )
    parser.add_argument("--bytes-input", default=None, help="KServe BYTES input name (default images/texts)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--items", type=int, default=1, help="items per request")
    parser.add_argument("--seq-len", type=int, default=64, help="text tensors: tokens per text")
    parser.add_argument("--image-side", type=int, default=480, help="encoded images: width and height")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration (bounded)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline in seconds")
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="KServe tensors: pass the inputs in a system shared memory region, not in the message "
        "(the server needs --system-shared-memory)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="TCP connections to spread the requests over; a server with --workers N gives each "
        "connection to one worker, so use several (e.g. 4 per worker)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.shared_memory and args.protocol == "fineserve":
        parser.error("--shared-memory is KServe's: use --protocol kserve or kserve-stream")
    if not args.target.startswith(LOOPBACK):
        parser.error("--target must be a loopback address: this benchmark only loads local servers")
    if not 0 < args.seconds <= 600 or not 1 <= args.concurrency <= 4096 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 600], --warmup in [0, 60] and --concurrency in 1..4096")
    if args.items < 1:
        parser.error("--items must be >= 1")
    if not 1 <= args.connections <= args.concurrency:
        parser.error("--connections must be in 1..--concurrency")
    spec = read_model_spec(args.model_dir)
    load = Load(
        protocol=args.protocol,
        kind=args.kind,
        concurrency=args.concurrency,
        items=args.items,
        seconds=args.seconds,
        warmup_s=args.warmup,
        seq_len=args.seq_len,
        image_side=args.image_side,
        timeout=args.timeout,
        bytes_input=args.bytes_input,
        version_dir=args.model_dir,
        shared_memory=args.shared_memory,
        connections=args.connections,
    )
    try:
        result = asyncio.run(run_load(args.target, spec, load))
    except grpc.aio.AioRpcError as err:  # the first call failed: wrong target, model or input
        print(f"error: {args.target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    latency = f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
    print(
        f"{spec.name} {args.protocol}/{args.kind}{'/shm' if args.shared_memory else ''} "
        f"c={args.concurrency} items={args.items}: "
        f"{result['items_per_s']:.1f} items/s, {latency}, codes {result['codes']}"
    )
    write_json(args.json, {"benchmark": "load", "model": spec.name, "target": args.target, **result})
    return 0
