"""The baseline: raw onnxruntime ``session.run`` on a published model, per batch size.

    fineserve bench raw --model-dir models/fashion/1 --variant fp32 --batch-sizes 1,8,32 \
        --seconds 5 --json bench/results/raw-fashion.json

Thread settings as given: ``--intra-threads`` per run and ``--callers`` runs side by side (the
server's ``intra_op_threads`` and ``instances``); threads spin during a run only with
``--spinning``, as the server's ``intra_op_spinning``. On CUDA the session must really run
on the CUDA execution provider: the benchmark fails rather than silently measuring the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from fineserve.bench.inputs import tensor_batch
from fineserve.bench.stats import latency_summary, positive_ints, positive_seconds, write_json
from fineserve.export.contract import read_model_spec


def make_session(
    path: Path, provider: str, intra_threads: int, inter_threads: int, spinning: bool = False
) -> Any:
    if provider == "cuda":
        # onnxruntime-gpu finds the CUDA/cuDNN libraries that torch brings, when present.
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401
    import onnxruntime as ort

    from fineserve.server.runtime import session_options

    # The server's own session options (server/runtime.py), so both sides run alike.
    ort_provider = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
    options = session_options(intra_threads, inter_threads, spinning=spinning, provider=ort_provider)
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"error: CUDA requested but the session runs on {session.get_providers()}")
    return session


def add_spinning_flag(parser: argparse.ArgumentParser) -> None:
    """``--spinning/--no-spinning``, as the server's ``intra_op_spinning`` (off by default)."""
    parser.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="onnxruntime threads spin between a run's operators, stopping when it ends",
    )


def measure(
    session: Any, feeds: dict[str, Any], seconds: float, gap_s: float = 0.0, callers: int = 1
) -> dict[str, float]:
    """Runs back to back for ``seconds`` (or with ``gap_s`` idle seconds after each run, as a
    server sees its session when requests come one at a time; the gaps are not counted).

    With ``callers`` > 1, that many threads run the session side by side, as a server with that
    many instances does; items/s is then over the wall time, and gaps are not allowed.
    """
    if callers > 1 and gap_s:
        raise ValueError("idle gaps are measured with one caller")
    for _ in range(3):  # warm up: first runs allocate and pick kernels
        session.run(None, feeds)
    cpu = time.process_time()  # every thread of this process, onnxruntime's included
    per_caller: list[list[float]] = [[] for _ in range(callers)]
    end = time.perf_counter() + seconds

    def call(latencies: list[float]) -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            session.run(None, feeds)
            latencies.append(time.perf_counter() - start)
            if gap_s:
                time.sleep(gap_s)

    started = time.perf_counter()
    if callers == 1:
        call(per_caller[0])
    else:
        threads = [threading.Thread(target=call, args=(lat,)) for lat in per_caller]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall = time.perf_counter() - started
    cpu_s = time.process_time() - cpu
    latencies = [latency for lat in per_caller for latency in lat]
    batch = len(next(iter(feeds.values())))
    # With idle gaps, throughput counts the runs' own time, not the gaps.
    busy = sum(latencies) if gap_s else wall
    return {
        "batch": batch,
        "callers": callers,
        "runs": len(latencies),
        "items_per_s": batch * len(latencies) / busy,
        "cpu_ms_per_run": cpu_s * 1e3 / len(latencies),
        **latency_summary(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench raw", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="<repo>/<model>/<version>")
    parser.add_argument("--variant", default="fp32", choices=["fp32", "fp16", "int8"], help="graph variant")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="execution provider")
    parser.add_argument(
        "--batch-sizes",
        type=positive_ints,
        default=positive_ints("1,4,16,32"),
        help="comma-separated batch sizes",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=64,
        help="unused when the model has its tokenizer (real texts are tokenized)",
    )
    parser.add_argument("--seconds", type=positive_seconds, default=3.0, help="measuring time per batch size")
    parser.add_argument("--intra-threads", type=int, default=0, help="0 = onnxruntime's default")
    parser.add_argument("--inter-threads", type=int, default=1)
    parser.add_argument(
        "--callers", type=int, default=1, help="threads running the session side by side (server instances)"
    )
    add_spinning_flag(parser)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="idle milliseconds after each run, as a server's session rests between lone requests",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.callers < 1:
        parser.error("--callers must be >= 1")
    if args.intra_threads < 0 or args.inter_threads < 0:
        parser.error("--intra-threads and --inter-threads must be >= 0 (0: onnxruntime's default)")
    if args.gap_ms < 0 or (args.gap_ms and args.callers > 1):
        parser.error("--gap-ms must be >= 0, and is for one caller")
    spec = read_model_spec(args.model_dir)
    path = args.model_dir / spec.variant(args.variant).file
    try:
        session = make_session(path, args.provider, args.intra_threads, args.inter_threads, args.spinning)
    except Exception as err:  # onnxruntime's own errors: not a graph, an unknown operator, ...
        parser.error(f"{path}: onnxruntime cannot load it ({type(err).__name__})")
    rows = []
    print(f"{spec.name} v{spec.version} {args.variant} on {session.get_providers()[0]}")
    print(f"{'batch':>6} {'items/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/run':>10}")
    for batch in args.batch_sizes:
        row = measure(
            session,
            tensor_batch(spec, batch, args.seq_len, version_dir=args.model_dir),
            args.seconds,
            gap_s=args.gap_ms / 1000,
            callers=args.callers,
        )
        rows.append(row)
        figures = f"{row['items_per_s']:>10.1f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}"
        figures += f" {row['cpu_ms_per_run']:>10.3f}"
        print(f"{batch:>6} {figures}", flush=True)
    best = max(rows, key=lambda r: r["items_per_s"])
    print(f"best: {best['items_per_s']:.1f} items/s at batch {best['batch']}")
    write_json(
        args.json,
        {
            "benchmark": "raw",
            "model": spec.name,
            "version": spec.version,
            "variant": args.variant,
            "provider": session.get_providers()[0],
            "rows": rows,
        },
    )
    return 0
