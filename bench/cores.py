"""fineserve bench cores: throughput against requests in flight, by worker count, on one machine.

    fineserve bench cores --workers 1,2 --concurrency 1,8,32,256 --out bench/results/cores.json
    fineserve bench cores --pinned --out bench/results/cores-pinned.json

One closed-loop KServe load (``fineserve bench load``'s: one item per request, ready tensors, or
with ``--kind bytes`` encoded images / texts) is sent to ``fineserve serve --workers N`` for each N
and each concurrency, on the near-free model (bench/nearfree.py, built in a scratch repository;
its figures are the serving path's own cost) unless ``--model-dir`` names a served version
(``models/fashion/1``: the server is started on its repository). Each row has requests/s,
p50/p99 and the server's CPU per answered request (every worker's threads, from /proc).

``--pinned`` runs one worker with the server on the last core and this load generator on the
first (``taskset``), and reports requests/s per server core: a figure that does not depend on how
much of the machine the load generator takes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fineserve.bench.loadgen import Load, run_load_with_server_cpu
from fineserve.bench.nearfree import publish_near_free_model
from fineserve.bench.server_process import ServerProcess, free_port
from fineserve.bench.stats import positive_ints, write_json
from fineserve.export.contract import ModelSpec, read_model_spec


def pin_this_process(cores: Iterable[int]) -> None:
    """Every thread of this process to ``cores`` (threads it starts later inherit it)."""
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), set(cores))


def _cores_of(pids: list[int]) -> list[int]:
    """The cores the server's processes may run on, together."""
    return sorted(set().union(*(os.sched_getaffinity(pid) for pid in pids)))


def sweep(args: argparse.Namespace, version_dir: Path, spec: ModelSpec) -> list[dict[str, Any]]:
    worker_counts = [1] if args.pinned else args.workers
    rows: list[dict[str, Any]] = []
    cores = sorted(os.sched_getaffinity(0))
    try:
        for workers in worker_counts:
            rows += _measure_workers(args, version_dir, spec, workers, cores)
    finally:
        pin_this_process(cores)  # --pinned moved this process's threads to one core
    return rows


def _measure_workers(
    args: argparse.Namespace,
    version_dir: Path,
    spec: ModelSpec,
    workers: int,
    cores: list[int],
) -> list[dict[str, Any]]:
    rows = []
    flags = ["--log-level", "WARNING", "--workers", str(workers)]
    # Pinned, the server starts on its core, so it sizes its threads for that one core.
    wrapper = ["taskset", "-c", str(cores[-1])] if args.pinned else []
    with ServerProcess(version_dir.parent.parent, flags, grpc_port=free_port(), wrapper=wrapper) as server:
        server.start()
        if args.pinned:
            pin_this_process(cores[:1])
        for concurrency in args.concurrency:
            # One connection reaches one worker: with several, the requests are spread.
            connections = 1 if workers == 1 else min(concurrency, 4 * workers)
            load = Load(
                kind=args.kind,
                concurrency=concurrency,
                connections=connections,
                seconds=args.seconds,
                warmup_s=args.warmup,
                version_dir=version_dir,
            )
            row = run_load_with_server_cpu(server.target, spec, load, server.cpu_seconds)
            row.update(workers=workers, pinned=args.pinned, server_cores=_cores_of(server.pids()))
            if args.pinned:
                row["requests_per_s_per_server_core"] = row["items_per_s"]
            print(
                f"  workers {workers}{' (pinned)' if args.pinned else ''} {args.kind} c={concurrency:<4}"
                f" {row['items_per_s']:8.1f} requests/s  p50 {row['p50_ms']:7.2f} ms"
                f"  p99 {row['p99_ms']:7.2f} ms  server {row['server_cpu_us_per_request']:6.0f}"
                f" cpu-us/request  codes {row['codes']}",
                flush=True,
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench cores", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=Path, help="a served version folder (default: the near-free model)"
    )
    parser.add_argument("--workers", type=positive_ints, default=[1, 2], help="worker counts (1,2)")
    parser.add_argument(
        "--concurrency", type=positive_ints, default=[1, 8, 32, 256], help="requests in flight (1,8,32,256)"
    )
    parser.add_argument(
        "--kind",
        choices=["tensor", "bytes"],
        default="tensor",
        help="ready tensors, or encoded images / texts the server preprocesses",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument(
        "--pinned", action="store_true", help="one worker: the server and this load on their own cores"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60 or max(args.concurrency) > 4096:
        parser.error("--seconds must be in (0, 600], --warmup in [0, 60], --concurrency at most 4096")
    if args.pinned and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pinned needs two cores")
    with tempfile.TemporaryDirectory() as scratch:
        version_dir = args.model_dir or publish_near_free_model(Path(scratch) / "models")
        spec = read_model_spec(version_dir)
        rows = sweep(args, version_dir, spec)
        write_json(args.out, {"model": spec.name, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
