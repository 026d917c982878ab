"""KServe unary ``ModelInfer`` against ``ModelStreamInfer`` (one open stream per client worker).

    fineserve bench stream --model-repository models --model fashion --concurrency 1,64

Starts the server (same thread settings as the suite) and alternates the two protocols in short
rounds, one item per request as ready tensors; prints the medians of items/s, p50 and the
server's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from fineserve.bench.loadgen import Load, run_load
from fineserve.bench.server_process import ServerProcess, free_port
from fineserve.bench.stats import write_json
from fineserve.export.contract import list_versions, read_model_spec

PROTOCOLS = ("kserve", "kserve-stream")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench stream", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fashion")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated requests in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="per protocol and round")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    versions = list_versions(args.model_repository / args.model)
    if not versions:
        parser.error(f"no model {args.model!r} in {args.model_repository}")
    version_dir = args.model_repository / args.model / str(max(versions))
    spec = read_model_spec(version_dir)
    threads = os.cpu_count() or 1
    flags = [f"--intra-op-threads={threads}", "--inter-op-threads=1", "--log-level=WARNING"]
    rows: dict[str, list[dict[str, Any]]] = {}
    with (
        tempfile.TemporaryDirectory() as logs,
        ServerProcess(
            args.model_repository,
            flags,
            Path(logs) / "server.log",
            grpc_port=free_port(),  # at WARNING the server does not log the ports it binds
            metrics_port=free_port(),
        ) as server,
    ):
        server.start()
        for _ in range(args.rounds):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for protocol in PROTOCOLS:
                    load = Load(
                        protocol=protocol, concurrency=concurrency, seconds=args.seconds, warmup_s=0.3
                    )
                    cpu = server.cpu_seconds()
                    row = asyncio.run(run_load(server.target, spec, load))
                    row["server_cpu_ms_per_request"] = (
                        (server.cpu_seconds() - cpu) * 1e3 / max(1, row["requests_ok"])
                    )
                    rows.setdefault(f"{protocol} c={concurrency}", []).append(row)
    summary = {}
    for key, runs in rows.items():
        summary[key] = {
            field: median(r[field] for r in runs)
            for field in ("items_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
        }
        figures = summary[key]
        print(
            f"{args.model} {key:<20} {figures['items_per_s']:8.0f} items/s  p50 {figures['p50_ms']:6.2f} ms"
            f"  p99 {figures['p99_ms']:7.2f} ms"
            f"  server {figures['server_cpu_ms_per_request']:.2f} cpu-ms/request"
        )
    write_json(args.json, {"benchmark": "stream", "model": args.model, "summary": summary, "rounds": rows})
    return 0
