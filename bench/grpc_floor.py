"""fineserve bench floor: what gRPC itself costs per request, beside what the server costs.

    fineserve bench floor --concurrency 8,32 --json floor.json

The same closed-loop KServe load (``fineserve bench load``'s) is sent, one server at a time, to
three servers on loopback:

- ``grpc.aio``: a bare ``grpc.aio`` ModelInfer that answers a fixed reply of the model's output
  shape (no interceptors, no checks, no metrics, no model): the floor of the transport fineserve
  is built on;
- ``grpc-sync``: the same on grpc's thread-pool server;
- ``fineserve``: ``fineserve serve`` on the version's repository, as users run it.

For each it reports requests/s, p50/p99, and the server process's CPU per answered request
(user + system, all threads, from /proc): the part of fineserve's CPU per request that is its own
is the difference from the ``grpc.aio`` row. The load generator shares the machine: compare rows
of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fineserve.bench.loadgen import Load, run_load_with_server_cpu
from fineserve.bench.nearfree import publish_near_free_model
from fineserve.bench.server_process import ServerProcess, free_port, process_cpu_seconds
from fineserve.bench.stats import positive_ints, write_json
from fineserve.export.contract import read_model_spec
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as pb_grpc

FLOORS = ("grpc.aio", "grpc-sync")


def fixed_reply(request: Any, classes: int) -> Any:
    """A reply shaped like a classifier's: one [1, classes] FP32 output in raw_output_contents."""
    reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    output = reply.outputs.add(name="logits", datatype="FP32")
    output.shape.extend([1, classes])
    reply.raw_output_contents.append(np.zeros(classes, np.float32).tobytes())
    return reply


class _AsyncFloor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, classes: int) -> None:
        self.classes = classes

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
        return fixed_reply(request, self.classes)


class _SyncFloor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, classes: int) -> None:
        self.classes = classes

    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
        return fixed_reply(request, self.classes)


async def _serve_aio(port: int, classes: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_AsyncFloor(classes), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("floor listening", flush=True)
    await server.wait_for_termination()


def _serve_sync(port: int, classes: int, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(threads))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_SyncFloor(classes), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("floor listening", flush=True)
    server.wait_for_termination()


class FloorProcess:
    """One floor server as a subprocess of this module (``--serve aio|sync``)."""

    def __init__(self, kind: str, classes: int, threads: int) -> None:
        self.port = free_port()
        self.command = [
            sys.executable, "-m", "fineserve.bench.grpc_floor", "--serve", kind,
            "--port", str(self.port), "--classes", str(classes), "--threads", str(threads),
        ]  # fmt: skip
        self.process: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout)
        if not ready or self.process.stdout.readline().strip() != "floor listening":
            self.stop()
            raise RuntimeError(f"the floor server did not start in {timeout:g} s: {' '.join(self.command)}")

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _print(server: str, load: Load, row: dict[str, Any]) -> None:
    print(
        f"  {server:<10} c={load.concurrency:<4} {row['items_per_s']:8.1f} requests/s"
        f"  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
        f"  server {row['server_cpu_us_per_request']:6.0f} cpu-us/request  codes {row['codes']}",
        flush=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = read_model_spec(args.model_dir)
    classes = len(spec.labels)
    repository = args.model_dir.resolve().parent.parent
    rows: list[dict[str, Any]] = []
    servers: list[tuple[str, Any]] = [
        (kind, FloorProcess("aio" if kind == "grpc.aio" else "sync", classes, args.sync_threads))
        for kind in FLOORS
    ]
    quiet = ["--log-level", "WARNING"]
    servers.append(("fineserve", ServerProcess(repository, quiet, grpc_port=free_port())))
    for name, server in servers:
        try:
            server.start()  # fineserve: until health says SERVING
            for concurrency in args.concurrency:
                load = Load(
                    concurrency=concurrency,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    version_dir=args.model_dir,
                )
                row = run_load_with_server_cpu(server.target, spec, load, server.cpu_seconds)
                row.update(server=name, concurrency=concurrency)
                _print(name, load, row)
                rows.append(row)
                time.sleep(0.2)
        finally:
            server.stop()
    return {"model": spec.name, "model_dir": str(args.model_dir), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench floor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=Path, help="the served version folder (default: the near-free model)"
    )
    parser.add_argument(
        "--concurrency", type=positive_ints, default=[1, 8, 32, 256], help="requests in flight (1,8,32,256)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--sync-threads", type=int, default=16, help="grpc-sync: handler threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    # The floor servers themselves (this module started as a subprocess).
    parser.add_argument("--serve", choices=["aio", "sync"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "aio":
        asyncio.run(_serve_aio(args.port, args.classes))
        return 0
    if args.serve == "sync":
        _serve_sync(args.port, args.classes, args.threads)
        return 0
    if not all(1 <= c <= 4096 for c in args.concurrency) or not 0 < args.seconds <= 600:
        parser.error("--concurrency must be in 1..4096 and --seconds in (0, 600]")
    with tempfile.TemporaryDirectory() as scratch:
        if args.model_dir is None:
            args.model_dir = publish_near_free_model(Path(scratch) / "models")
        result = run(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
