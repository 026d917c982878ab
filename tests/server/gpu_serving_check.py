"""GPU check (run by hand on a CUDA machine; not collected by pytest): the server on the CUDA
provider with the fp16 variant, and its throughput beside raw onnxruntime's on the same graph.

    PYTHONPATH=$PWD python tests/server/gpu_serving_check.py --device cuda --out results.json

Builds a model repository with torchvision's ResNet-50 (random weights: throughput does not depend
on them) exported to ONNX (fp32) and converted to fp16 with fp32 inputs/outputs; measures raw
onnxruntime items/s at several batch sizes (host arrays in and out); then starts the real server
and drives it from client processes with single-image requests, reporting items/s and the batch
sizes the dynamic batcher formed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 224


def build_repository(root: Path, model_name: str) -> Path:
    import onnx
    import torch
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from fineserve.export.contract import ImagePreprocessing, ModelSpec, TensorSpec, Variant, write_model_spec

    version_dir = root / "resnet" / "1"
    version_dir.mkdir(parents=True)
    net = _network(model_name).eval()
    dummy = torch.randn(1, 3, SIZE, SIZE)
    fp32 = version_dir / "model.onnx"
    torch.onnx.export(
        net,
        (dummy,),
        str(fp32),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    fp16_model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(fp16_model, str(version_dir / "model.fp16.onnx"))
    spec = ModelSpec(
        name="resnet",
        version=1,
        task="image-classification",
        labels=tuple(f"class_{i}" for i in range(1000)),
        inputs=(TensorSpec("pixel_values", "FP32", (-1, 3, SIZE, SIZE)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 1000)),),
        variants={
            "fp32": Variant("model.onnx", "fp32", fp32.stat().st_size),
            "fp16": Variant("model.fp16.onnx", "fp16", (version_dir / "model.fp16.onnx").stat().st_size),
        },
        max_batch_size=256,
        image=ImagePreprocessing(
            height=SIZE, width=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
        ),
    )
    write_model_spec(version_dir, spec)
    return version_dir


def _network(name: str) -> Any:
    import torch

    if name == "small":  # for a dry run where torchvision is not installed
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 1000),
        )
    import torchvision

    return getattr(torchvision.models, name)()


def raw_onnxruntime(path: Path, provider: str, batches: list[int], seconds: float) -> dict[str, float]:
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers = [
            ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
            "CPUExecutionProvider",
        ]
    session = ort.InferenceSession(str(path), providers=providers)
    used = session.get_providers()[0]
    results = {"provider": used}
    for batch in batches:
        x = np.random.default_rng(0).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)
        for _ in range(3):
            session.run(None, {"pixel_values": x})
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, {"pixel_values": x})
            runs += 1
        results[f"b{batch}"] = runs * batch / (time.perf_counter() - started)
    return results  # type: ignore[return-value]


def client_process(  # noqa: PLR0917 (a process target takes positional arguments)
    target: str, concurrency: int, seconds: float, images_per_request: int, jpeg: bool, queue: Any
) -> None:
    import grpc

    from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb

    if jpeg:
        import io

        from PIL import Image

        pixels = np.random.default_rng(1).integers(0, 256, (SIZE + 32, SIZE + 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        item = pb.ImageInput(encoded=buffer.getvalue())
    else:
        image = np.random.default_rng(1).normal(size=(3, SIZE, SIZE)).astype("<f4")
        item = pb.ImageInput(tensor=pb.Tensor(shape=[3, SIZE, SIZE], fp32_data=image.tobytes()))
    request = pb.ClassifyRequest(
        model="resnet", images=[item] * images_per_request, top_k=1
    ).SerializeToString()

    async def run() -> tuple[int, int]:
        options = [
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20),
        ]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            call = channel.unary_unary("/fineserve.v1.Fineserve/Classify")
            done = failed = 0
            stop_at = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal done, failed
                while time.perf_counter() < stop_at:
                    try:
                        await call(request, timeout=30)
                        done += images_per_request
                    except grpc.RpcError:
                        failed += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return done, failed

    queue.put(asyncio.run(run()))


def load_test(  # noqa: PLR0917
    target: str, processes: int, concurrency: int, seconds: float, images: int, jpeg: bool
) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=client_process, args=(target, concurrency, seconds, images, jpeg, queue))
        for _ in range(processes)
    ]
    started = time.perf_counter()
    for w in workers:
        w.start()
    totals = [queue.get(timeout=seconds + 120) for _ in workers]
    elapsed = time.perf_counter() - started
    for w in workers:
        w.join()
    done = sum(t[0] for t in totals)
    # Each client sends for exactly `seconds` once connected; process start-up is not counted.
    return {"items_per_s": done / seconds, "failed": sum(t[1] for t in totals), "wall_s": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-check"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and load runs")
    parser.add_argument(
        "--concurrency", type=int, default=256, help="requests in flight, over 4 client processes"
    )
    args = parser.parse_args()
    if args.device == "cuda":
        import torch  # noqa: F401  (loads the CUDA/cuDNN libraries onnxruntime-gpu uses)

    report: dict[str, Any] = {"device": args.device, "model": args.model}
    started = time.perf_counter()
    version_dir = build_repository(args.workdir / "models", args.model)
    report["export_s"] = time.perf_counter() - started
    variant_file = "model.fp16.onnx" if args.device == "cuda" else "model.onnx"
    batches = [1, 8, 32, 64, 128] if args.device == "cuda" else [1, 8]
    if args.quick:
        batches = [1, 64]
    report["raw_onnxruntime"] = raw_onnxruntime(
        version_dir / variant_file, args.device, batches, args.seconds / 3
    )
    print(json.dumps(report, indent=1), flush=True)

    from fineserve.server.app import Server
    from fineserve.server.config import load_settings
    from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
    from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc

    settings = load_settings(
        model_repository=args.workdir / "models",
        grpc_host="localhost",
        grpc_port=0,
        metrics_port=-1,
        device=args.device,
        max_batch_size=128,
        max_queue_delay_ms=2,
        max_queue_size=4096,
        repository_poll_s=0,
        max_receive_message_bytes=256 << 20,
        max_request_bytes=256 << 20,
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(300)

    async def make() -> Server:
        return Server(settings)

    server = call(make())
    started = time.perf_counter()
    call(server.start())
    report["server_start_s"] = time.perf_counter() - started
    target = f"localhost:{server.grpc_port}"
    import grpc

    with grpc.insecure_channel(target) as channel:
        [info] = pb_grpc.FineserveStub(channel).ListModels(pb.ListModelsRequest()).models
    report["served"] = [(v.version, v.state, v.execution_provider, v.variant) for v in info.versions]
    if args.device == "cuda":
        assert info.versions[0].execution_provider == "CUDAExecutionProvider", report["served"]
        assert info.versions[0].variant == "fp16", report["served"]

    async def core_only(seconds: float, concurrency: int) -> float:
        # The core without gRPC: many coroutines calling DataPlane.infer on the server's loop.
        x = np.random.default_rng(2).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
        stop_at = time.perf_counter() + seconds
        done = 0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await server.dataplane.infer("resnet", None, {"pixel_values": x}, deadline=None)
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / seconds

    per = max(1, args.concurrency // 4)  # requests in flight per client process
    runs: list[tuple[str, Any]] = [
        (
            f"core only, 1 image/call, {args.concurrency} concurrent",
            lambda: {"items_per_s": call(core_only(args.seconds, args.concurrency))},
        ),
        (
            f"gRPC tensors, 1 image/request, {per * 4} in flight",
            lambda: load_test(target, 4, per, args.seconds, 1, False),
        ),
        ("gRPC tensors, 16 images/request", lambda: load_test(target, 4, 4, args.seconds, 16, False)),
        (
            f"gRPC JPEG 288x256, 1 image/request, {per * 4} in flight",
            lambda: load_test(target, 4, per, args.seconds, 1, True),
        ),
        ("gRPC JPEG 288x256, 16 images/request", lambda: load_test(target, 4, 4, args.seconds, 16, True)),
    ]
    for name, run in runs[:3] if args.quick else runs:
        before = server.dataplane.statistics("resnet", None)[0]
        result = run()
        after = server.dataplane.statistics("resnet", None)[0]
        batches = max(after.execution_count - before.execution_count, 1)
        requests = max(after.success.count - before.success.count, 1)
        result["mean_batch_size"] = (after.inference_count - before.inference_count) / batches
        result["infer_ms_per_batch"] = (after.compute_infer.ns - before.compute_infer.ns) / requests / 1e6
        result["queue_ms_per_request"] = (after.queue.ns - before.queue.ns) / requests / 1e6
        result["request_ms"] = (after.success.ns - before.success.ns) / requests / 1e6
        report[name] = result
        print(name, json.dumps(result), flush=True)
    call(server.stop(1.0))
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
