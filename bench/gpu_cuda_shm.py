"""CUDA shared memory against plain tensors in the message, on a running server with a GPU host.

    python -m fineserve.bench.gpu_cuda_shm --target 127.0.0.1:8001 --model fashion \
        --out bench/results/gpu-cuda-shm.json

Does CUDA shared memory gain anything? The same request runs two ways, one at a time, for
``--iterations`` requests each after a warmup: ``plain``, tensors in ``raw_input_contents`` and
the output in the response; ``cuda_shm``, the inputs already in device memory of this process
(registered by their CUDA IPC handle) and the output written into device memory. Reported per
way: latency percentiles and items/s, and the largest difference between the two outputs. The
server must run with ``--cuda-shared-memory`` on the same host; with tokens on, ``--token`` must
be the admin token (registering is management). Device memory comes from ``cudaMalloc`` through
the server's own ctypes binding (``server/cuda_runtime.py``): an allocation of its own, so its IPC
handle names exactly the region (a caching allocator's tensor may sit inside a larger block).
Refuses (exit 2) on a machine without a usable CUDA device. ``fineserve bench gpu`` calls ``main``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fineserve.bench.stats import latency_summary, write_json
from fineserve.server.cuda_runtime import CudaRuntime
from fineserve.server.errors import DeviceUnavailable

_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fineserve bench gpu-cuda-shm", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of a server with --cuda-shared-memory")
    parser.add_argument("--model", required=True, help="a model served there (its tensor inputs are used)")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON results go")
    parser.add_argument("--batch", type=int, default=32, help="rows per request")
    parser.add_argument("--seq-len", type=int, default=128, help="length of token inputs of text models")
    parser.add_argument("--iterations", type=int, default=200, help="timed requests per way")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per way first")
    parser.add_argument("--device-id", type=int, default=0, help="the GPU the regions are allocated on")
    parser.add_argument("--token", default="", help="bearer token (the admin one when tokens are on)")
    parser.add_argument(
        "--cuda-runtime-library", default=None, help="the libcudart to load (default: as the server finds it)"
    )
    return parser.parse_args(argv)


def synthetic_inputs(metadata: Any, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """The model's tensor inputs (not its BYTES one), batch axis ``batch``, other free axes ``seq_len``."""
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray] = {}
    for tensor in metadata.inputs:
        if tensor.datatype not in _DTYPES:
            continue
        shape = [batch if i == 0 else (seq_len if d < 0 else d) for i, d in enumerate(tensor.shape)]
        dtype = _DTYPES[tensor.datatype]
        if tensor.name == "input_ids":
            inputs[tensor.name] = rng.integers(1, 100, size=shape).astype(dtype)
        elif tensor.name in ("attention_mask", "token_type_ids"):
            inputs[tensor.name] = np.full(shape, tensor.name == "attention_mask", dtype=dtype)
        else:
            inputs[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return inputs


def timed(call: Callable[[], Any], warmup: int, iterations: int, batch: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    latencies = []
    started = time.perf_counter()
    for _ in range(iterations):
        begin = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    return {**latency_summary(latencies), "items_per_s": batch * iterations / elapsed}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runtime = CudaRuntime.load(args.cuda_runtime_library)
    except DeviceUnavailable as err:
        print(f"gpu_cuda_shm: refused: {err.message}", file=sys.stderr)
        return 2
    import grpc

    from fineserve.server.pb.inference import grpc_service_pb2 as pb
    from fineserve.server.pb.inference import grpc_service_pb2_grpc as pb_grpc

    metadata_headers = [("authorization", f"Bearer {args.token}")] if args.token else []
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        model = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=args.model), metadata=metadata_headers, timeout=30
        )
        inputs = synthetic_inputs(model, args.batch, args.seq_len)
        if not inputs:
            print(f"gpu_cuda_shm: model {args.model!r} has no tensor inputs", file=sys.stderr)
            return 2
        output = model.outputs[0].name

        def request() -> Any:
            message = pb.ModelInferRequest(model_name=args.model)
            for name, array in inputs.items():
                datatype = next(t.datatype for t in model.inputs if t.name == name)
                message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            message.outputs.add(name=output)
            return message

        plain_request = request()
        plain_request.raw_input_contents.extend(np.ascontiguousarray(a).tobytes() for a in inputs.values())
        plain_reply = stub.ModelInfer(plain_request, metadata=metadata_headers, timeout=60)
        expected = np.frombuffer(plain_reply.raw_output_contents[0], np.float32)

        prefix = f"bench_{uuid.uuid4().hex[:8]}"
        allocations: list[int] = []
        registered: list[str] = []

        def region(name: str, byte_size: int) -> int:
            pointer = runtime.malloc(byte_size, args.device_id)
            allocations.append(pointer)
            register = pb.CudaSharedMemoryRegisterRequest(
                name=name,
                raw_handle=runtime.ipc_handle(pointer),
                device_id=args.device_id,
                byte_size=byte_size,
            )
            stub.CudaSharedMemoryRegister(register, metadata=metadata_headers, timeout=30)
            registered.append(name)
            return pointer

        try:
            shm_request = request()
            for tensor, (name, array) in zip(shm_request.inputs, inputs.items(), strict=True):
                data = np.ascontiguousarray(array).tobytes()
                runtime.copy_to_device(region(f"{prefix}_{name}", len(data)), data, args.device_id)
                tensor.parameters["shared_memory_region"].string_param = f"{prefix}_{name}"
                tensor.parameters["shared_memory_byte_size"].int64_param = len(data)
            out_bytes = expected.nbytes
            out_pointer = region(f"{prefix}_out", out_bytes)
            wanted = shm_request.outputs[0]
            wanted.parameters["shared_memory_region"].string_param = f"{prefix}_out"
            wanted.parameters["shared_memory_byte_size"].int64_param = out_bytes
            stub.ModelInfer(shm_request, metadata=metadata_headers, timeout=60)
            written = np.frombuffer(runtime.copy_to_host(out_pointer, out_bytes, args.device_id), np.float32)
            difference = float(np.abs(written - expected).max())

            def infer(message: Any) -> Callable[[], Any]:
                return lambda: stub.ModelInfer(message, metadata=metadata_headers, timeout=60)

            results = {
                "plain": timed(infer(plain_request), args.warmup, args.iterations, args.batch),
                "cuda_shm": timed(infer(shm_request), args.warmup, args.iterations, args.batch),
            }
        finally:
            for name in registered:
                unregister = pb.CudaSharedMemoryUnregisterRequest(name=name)
                stub.CudaSharedMemoryUnregister(unregister, metadata=metadata_headers, timeout=30)
            for pointer in allocations:
                runtime.free(pointer)
    payload = {
        "target": args.target,
        "model": args.model,
        "batch": args.batch,
        "iterations": args.iterations,
        "input_bytes": int(sum(a.nbytes for a in inputs.values())),
        "output_bytes": out_bytes,
        "max_abs_difference": difference,
        **results,
    }
    if not difference <= 1e-5:  # both ways ran the same request: the outputs must agree
        print(f"gpu_cuda_shm: the CUDA shared memory output differs by {difference}", file=sys.stderr)
        write_json(args.out, payload)
        return 1
    for way, numbers in results.items():
        print(f"{way:9s} p50 {numbers['p50_ms']:.3f} ms  {numbers['items_per_s']:.0f} items/s")
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
