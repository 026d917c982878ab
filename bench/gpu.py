"""The GPU check: raw onnxruntime at its best against the served models, on one machine, in a
time budget (issue #18 item 5; docs/performance.md, "GPU check").

    fineserve bench gpu --model-repository models --models imagenet,sentiment \
        --out bench/results/gpu/h100.json --budget-s 230

For each model (and a ResNet-50 with random weights, built here, comparable with the reference
figures of ../shared/GPU.md): raw onnxruntime through the server's own session code and options
(``ModelSession``, IO binding) per batch size; the data-path options against each other (plain
``session.run``, IO binding, CUDA graphs, cuDNN search), raw; the served model over KServe at
concurrency 1, 16, 64, 256 with 1 and 16 items per request, ready tensors and JPEGs / texts, per
``--workers`` count where ``fineserve serve`` has workers; the GPU's utilisation (NVML) in each
window; the preprocessing ceiling (decode / tokenise rate per core x cores against the GPU's best
rate); and the issue's targets as ratios. Every window is sized from ``--budget-s``. One JSON
names the device (GPU, driver, onnxruntime). On ``--device cpu`` the same runs on the CPU provider
and the JSON says cpu: ``--smoke`` is that, small and short, for CI.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

from fineserve.bench.gpu_device import GpuUtilisation, build_resnet, cuda_library_env, describe_device
from fineserve.bench.inputs import tensor_batch
from fineserve.bench.loadgen import Load, run_load
from fineserve.bench.preprocess_bench import measure_preprocessing
from fineserve.bench.raw_ort import measure
from fineserve.bench.server_process import ServerProcess, free_port
from fineserve.bench.stats import machine, positive_ints, write_json
from fineserve.export.contract import ModelSpec, list_versions, read_model_spec

CUDA = "CUDAExecutionProvider"


class Budget:
    """Seconds left for the run; each window gets an even share of what is left over the
    windows still to come, within [``low``, ``high``], after ``RESERVE`` of the whole for what is
    not a window (opening sessions, exporting ResNet-50, starting servers and client processes)."""

    RESERVE = 0.25

    def __init__(self, total_s: float, low: float, high: float) -> None:
        self.started = time.perf_counter()
        self.total_s = total_s
        self.low, self.high = low, high
        self.windows_left = 0

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.started)

    def window(self) -> float:
        share = (self.left() - self.RESERVE * self.total_s) / max(self.windows_left, 1)
        self.windows_left = max(self.windows_left - 1, 0)
        return min(self.high, max(self.low, share))


class SessionRunner:
    """A ``ModelSession`` seen as an onnxruntime session by ``raw_ort.measure``."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, _outputs: Any, feeds: dict[str, Any]) -> Any:
        return self._session.run(feeds)


def open_session(version_dir: Path, spec: ModelSpec, device: str, **settings: Any) -> Any:
    """The server's own session for the variant it would serve, with the server's data path for
    padded batches (``settings`` override, e.g. ``cuda_graph="off"``); CUDA must really be CUDA."""
    from fineserve.server.config import load_settings
    from fineserve.server.runtime import CPU, ModelSession, choose_variant, plan_data_path

    provider = CUDA if device == "cuda" else CPU
    config = load_settings(device=device, **settings)
    variant = choose_variant(spec, provider, config)
    fixed = all(d > 0 for t in (*spec.inputs, *spec.outputs) for d in t.shape[1:])
    path, _ = plan_data_path(config, provider, padded=True, fixed_shapes=fixed)
    session = ModelSession(
        version_dir / variant.file, provider, config, 0, data_path=path, declared_outputs=spec.outputs
    )
    used = session.session.get_providers()[0]
    if used != provider:
        raise SystemExit(f"error: asked for {provider}, the session runs on {used}")
    return session


def raw_rows(
    session: Any,
    spec: ModelSpec,
    version_dir: Path,
    batches: list[int],
    *,
    budget: Budget,
    gpu: GpuUtilisation,
) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        feeds = tensor_batch(spec, batch, version_dir=version_dir)
        with gpu.window() as util:
            row = measure(SessionRunner(session), feeds, budget.window())
        row.update(util)
        rows.append(row)
        print(
            f"  raw batch {batch:>3}: {row['items_per_s']:9.1f} items/s  p50 {row['p50_ms']:.3f} ms",
            flush=True,
        )
    return rows


def compare_options(
    spec: ModelSpec, version_dir: Path, device: str, best_batch: int, *, budget: Budget, gpu: GpuUtilisation
) -> list[dict[str, Any]]:
    """The data-path settings against each other, raw, at batch 1 and the best batch."""
    options: list[dict[str, str]] = [
        {"io_binding": "off", "cuda_graph": "off"},
        {"io_binding": "on", "cuda_graph": "off"},
        {"io_binding": "on", "cuda_graph": "auto"},
    ]
    if spec.image is not None and device == "cuda":
        options.append({"io_binding": "on", "cuda_graph": "auto", "cudnn_conv_algo_search": "HEURISTIC"})
    out = []
    for option in options:
        session = open_session(version_dir, spec, device, **option)
        row: dict[str, Any] = {"settings": option, "data_path": session.data_path.describe()}
        for batch in sorted({1, best_batch}):
            row[f"batch_{batch}"] = raw_rows(session, spec, version_dir, [batch], budget=budget, gpu=gpu)[0]
        print(f"  options {option}: {row['data_path']}", flush=True)
        out.append(row)
        del session
    return out


def _client(target: str, spec: ModelSpec, load: Load) -> dict[str, Any]:
    # A client process: its own event loop and gRPC channel.
    return asyncio.run(run_load(target, spec, load))


def served_point(
    pool: concurrent.futures.Executor, clients: int, target: str, spec: ModelSpec, load: Load
) -> dict[str, Any]:
    """One load point over ``clients`` processes, each with its share of the requests in flight."""
    processes = max(1, min(clients, load.concurrency))
    shares = [load.concurrency // processes + (i < load.concurrency % processes) for i in range(processes)]
    futures = [
        pool.submit(_client, target, spec, Load(**{**load.__dict__, "concurrency": share}))
        for share in shares
    ]
    rows = [f.result() for f in futures]
    ok = sum(r["requests_ok"] for r in rows)
    codes: dict[str, int] = {}
    for r in rows:
        for code, count in r["codes"].items():
            codes[code] = codes.get(code, 0) + count
    # Each client's percentiles are over its own requests: with several clients, their mean.
    return {
        "concurrency": load.concurrency,
        "items_per_request": load.items,
        "kind": load.kind,
        "client_processes": processes,
        "requests_ok": ok,
        "codes": codes,
        "items_per_s": sum(r["items_per_s"] for r in rows),
        "p50_ms": sum(r["p50_ms"] for r in rows) / len(rows),
        "p99_ms": max(r["p99_ms"] for r in rows),
    }


def serve_flags(device: str, workers: int) -> list[str]:
    from fineserve.server.__main__ import build_parser

    flags = [f"--device={device}", "--max-queue-size=8192", "--repository-poll-s=0", "--log-level=WARNING"]
    if workers > 1 or "--workers" in build_parser().format_help():
        flags.append(f"--workers={workers}")
    return flags


def version_dir_of(repository: Path, name: str) -> Path:
    newest = int(max(list_versions(repository / name)))
    return repository / name / str(newest)


def make_repository(args: argparse.Namespace) -> Path:
    """The repository served: the named models (linked) and the ResNet-50 built here."""
    served: Path = args.workdir / "models"
    served.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        link = served / name
        if not link.exists():
            link.symlink_to((args.model_repository / name).resolve())
        if args.device == "cuda":
            check_fp16(version_dir_of(served, name))
    if not args.no_resnet:
        started = time.perf_counter()
        build_resnet(served, tiny=args.smoke)
        print(f"ResNet-50 (random weights) built in {time.perf_counter() - started:.1f} s", flush=True)
    return served


def check_fp16(version_dir: Path) -> None:
    """On CUDA the server serves fp16: a model without it is measured on a graph it would not serve."""
    spec = read_model_spec(version_dir)
    if "fp16" in spec.variants and (version_dir / spec.variants["fp16"].file).is_file():
        return
    raise SystemExit(
        f"error: {version_dir} has no fp16 variant; make it with the export pipeline "
        f'(fineserve export --precisions fp32,fp16 ..., docs/export.md) or `python -c "from '
        f'fineserve.export.variants import make_fp16; make_fp16(...)"` and add it to model.json'
    )


def targets(model: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets as measured ratios (None where a point was not measured)."""
    raw_best = max(r["items_per_s"] for r in model["raw"])
    raw_1 = next((r for r in model["raw"] if r["batch"] == 1), None)
    first: list[dict[str, Any]] = next(iter(model["served"].values()), [])
    points = {(p["kind"], p["concurrency"], p["items_per_request"]): p for p in first}
    sixteen = points.get(("tensor", 64, 16))
    single = points.get(("tensor", 256, 1))
    lone = points.get(("tensor", 1, 1))
    return {
        "raw_best_items_per_s": raw_best,
        "served_16_items_c64_over_raw_best": sixteen and sixteen["items_per_s"] / raw_best,
        "served_1_item_c256_over_raw_best": single and single["items_per_s"] / raw_best,
        "c1_p50_ms": lone and lone["p50_ms"],
        "raw_batch1_p50_ms": raw_1 and raw_1["p50_ms"],
        "c1_added_ms": lone and raw_1 and lone["p50_ms"] - raw_1["p50_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--models", default="imagenet,sentiment", help="comma-separated model names")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file (bench/results/gpu/...)")
    parser.add_argument("--budget-s", type=float, default=230.0, help="seconds for the whole run")
    parser.add_argument("--workers", type=positive_ints, default=[1], help="server worker counts, e.g. 1,4")
    parser.add_argument("--concurrency", type=positive_ints, default=positive_ints("1,16,64,256"))
    parser.add_argument(
        "--items", type=positive_ints, default=positive_ints("1,16"), help="items per request"
    )
    parser.add_argument("--batch-sizes", type=positive_ints, default=positive_ints("1,4,16,32,64,128,256"))
    parser.add_argument("--clients", type=int, default=0, help="client processes; 0: cores / 4, at least 1")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fineserve-gpu"))
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 baseline")
    parser.add_argument("--smoke", action="store_true", help="tiny ResNet stand-in and short windows (CI)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    started = time.perf_counter()
    if args.device == "cuda":
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401  (onnxruntime-gpu uses the CUDA/cuDNN libraries torch brings)
    budget = Budget(args.budget_s, low=0.2 if args.smoke else 1.0, high=0.3 if args.smoke else 5.0)
    gpu = GpuUtilisation(args.device)
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "device": describe_device(args.device),
        "machine": machine(),
        "utilisation_source": gpu.source,
        "budget_s": args.budget_s,
        "command": " ".join(["fineserve", "bench", "gpu", *(argv if argv is not None else sys.argv[1:])]),
        "models": {},
    }
    print(f"device: {result['device']}", flush=True)
    repository = make_repository(args)
    names = [*args.models, *([] if args.no_resnet else ["resnet50"])]
    specs = {name: read_model_spec(version_dir_of(repository, name)) for name in names}
    served_names = [n for n in names if n != "resnet50" or not args.smoke]
    points = [
        (kind, c, items) for kind in ("tensor", "bytes") for c in args.concurrency for items in args.items
    ]
    raw_windows = sum(len([b for b in args.batch_sizes if b <= s.max_batch_size]) for s in specs.values())
    budget.windows_left = raw_windows + 7 * len(names) + len(points) * len(served_names) * len(args.workers)

    # Raw onnxruntime, then the options, while no server runs.
    for name in names:
        spec, version_dir = specs[name], version_dir_of(repository, name)
        print(f"== {name}: raw onnxruntime ({budget.left():.0f} s left)", flush=True)
        session = open_session(version_dir, spec, args.device)
        batches = [b for b in args.batch_sizes if b <= spec.max_batch_size]
        model: dict[str, Any] = {
            "variant": spec.variants[choose(spec, args.device)].precision,
            "data_path": session.data_path.describe(),
            "raw": raw_rows(session, spec, version_dir, batches, budget=budget, gpu=gpu),
        }
        del session
        best = max(model["raw"], key=lambda r: r["items_per_s"])
        model["options"] = compare_options(
            spec, version_dir, args.device, best["batch"], budget=budget, gpu=gpu
        )
        if spec.image is not None or spec.text is not None:
            pre = measure_preprocessing(spec, version_dir, 16, min(budget.window(), 2.0), 480)
            cores = os.cpu_count() or 1
            pre["cores"] = cores
            # Decoding scales with the cores (one thread per core); tokenising here is per call.
            pre["ceiling_items_per_s"] = pre["items_per_s"] * cores
            pre["ceiling_over_raw_best"] = pre["ceiling_items_per_s"] / best["items_per_s"]
            model["preprocessing_ceiling"] = pre
        model["served"] = {}
        result["models"][name] = model

    # The served models, per worker count; client processes kept for every point.
    clients = args.clients or max(1, (os.cpu_count() or 1) // 4)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(clients, mp_context=context) as pool:
        for workers in args.workers:
            flags = serve_flags(args.device, workers)
            log_path = args.workdir / f"server-workers{workers}.log"
            env = cuda_library_env() if args.device == "cuda" else {}
            ports = {"grpc_port": free_port(), "metrics_port": -1}
            with ServerProcess(repository, flags, log_path, env=env, **ports) as server:
                seconds = server.start(600)
                print(f"== server ({' '.join(flags)}) SERVING in {seconds:.1f} s", flush=True)
                for name in served_names:
                    spec, version_dir = specs[name], version_dir_of(repository, name)
                    rows = []
                    for kind, concurrency, asked in points:
                        if budget.left() <= 0:
                            print(f"  budget spent: {name} {kind} c={concurrency} items={asked} skipped")
                            continue
                        items = min(asked, spec.max_batch_size)
                        window = budget.window()
                        load = Load(
                            kind=kind,
                            concurrency=concurrency,
                            items=items,
                            seconds=window,
                            warmup_s=min(0.5, window / 4),
                            version_dir=version_dir,
                            timeout=30,
                        )
                        with gpu.window() as util:
                            row = served_point(pool, clients, server.target, spec, load)
                        row.update(util)
                        rows.append(row)
                        errors = {k: v for k, v in row["codes"].items() if k != "OK"}
                        print(
                            f"  {name} {kind:<6} c={concurrency:<3} items={items:<2} "
                            f"{row['items_per_s']:9.1f} items/s  p50 {row['p50_ms']:.2f} ms"
                            f"  gpu {row.get('gpu_util_mean_pct', float('nan')):.0f}%"
                            + (f"  errors {errors}" if errors else ""),
                            flush=True,
                        )
                    result["models"][name]["served"][f"workers={workers}"] = rows
    for name, model in result["models"].items():
        if model["served"]:
            model["targets"] = targets(model)
            print(f"{name} targets: {model['targets']}", flush=True)
    result["elapsed_s"] = time.perf_counter() - started
    write_json(args.out, result)
    return 0


def choose(spec: ModelSpec, device: str) -> str:
    """The variant the server serves on ``device`` with the default settings."""
    from fineserve.server.config import load_settings
    from fineserve.server.runtime import CPU, choose_variant

    return choose_variant(spec, CUDA if device == "cuda" else CPU, load_settings(device=device)).precision


if __name__ == "__main__":
    sys.exit(main())
