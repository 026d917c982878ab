"""The serving benchmark suite: the real server against raw onnxruntime, in one run, on one machine.

    fineserve bench suite --model-repository models --models fashion,sentiment

Starts ``python -m fineserve.server`` as a subprocess on loopback with the same onnxruntime thread settings
as the raw baseline (intra-op threads per run, and as many runs side by side as the server has
instances), and measures, per model: raw ``session.run`` per batch size; served latency
at concurrency 1 against raw batch 1; throughput and latency against concurrency for ready
tensors (token ids) and for encoded images (texts); items per request against raw batch size;
served saturation against raw at its best batch size (raw measured before and after); dynamic
batching on vs off at concurrency 32 (a second server with ``--max-batch-size 1``, the two
interleaved); preprocessing throughput; resident memory idle and under load; seconds from
process start to health SERVING. Every figure is printed; JSON, markdown tables and PNG plots go
to ``--out``. The machine is shared and noisy: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from statistics import median
from typing import Any

from fineserve.bench.breakdown import empty_rpc_p50_ms, instance_count, mean_stage_ms, stage_totals
from fineserve.bench.inputs import tensor_batch
from fineserve.bench.loadgen import Load, run_load
from fineserve.bench.preprocess_bench import measure_preprocessing
from fineserve.bench.raw_ort import add_spinning_flag, make_session, measure
from fineserve.bench.report import write_plots, write_tables
from fineserve.bench.server_process import PeakMemory, ServerProcess, free_port
from fineserve.bench.stats import machine, positive_ints, positive_seconds, write_json
from fineserve.export.contract import ModelSpec, list_versions, read_model_spec
from fineserve.server.runtime import CPU, cpu_cores, plan_threads

MB = 1 << 20
# Idle time between raw runs for the "session idle in between" baseline: about what a server's
# session rests between requests at concurrency 1 (the rest of the round trip).
IDLE_GAP_S = 0.001


class Suite:
    """One suite run: the options, the servers, and every figure measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # The server's own rule for threads=0, made explicit for both sides.
        self.cores = cpu_cores()
        # Instances and threads of the model being measured: set, or (0) what the server measured
        # for it at load (its KServe ModelConfig), so that raw runs the same.
        self.instances = args.instances or 1
        self.threads = plan_threads(CPU, self.instances, args.threads).intra_op
        # Connections the load is spread over: the server gives each to one of its workers, which
        # the kernel picks at random; four per worker load them all (auto: up to one per core).
        workers = self.cores if args.workers == "auto" else int(args.workers)
        self.connections = args.connections or (1 if workers == 1 else 4 * workers)
        # The same onnxruntime settings on both sides of every ratio.
        self.server_flags = [
            f"--instances={args.instances}",
            f"--intra-op-threads={args.threads}",
            "--inter-op-threads=1",
            "--intra-op-spinning" if args.spinning else "--no-intra-op-spinning",
            "--system-shared-memory",  # for the saturation point with inputs in shared memory
            "--log-level=WARNING",
            f"--workers={args.workers}",
        ]
        self.results: dict[str, Any] = {
            "benchmark": "suite",
            "command": args.command_line,
            "threads": {
                "instances": args.instances,  # 0: each model's, measured by the server at load
                "intra_op": args.threads,  # 0: cores - instances + 1
                "inter_op": 1,
                "spinning": args.spinning,
            },
            "workers": args.workers,
            "connections": args.connections,  # 0: 1, or 4 per worker (capped by each point's concurrency)
            "seconds_per_point": args.seconds,
            "machine": machine(),
            "models": {},
        }

    # --- measuring ------------------------------------------------------------------------------

    def raw(
        self,
        session: Any,
        spec: ModelSpec,
        batch: int,
        version_dir: Path,
        *,
        seconds: float | None = None,
        gap_s: float = 0.0,
        callers: int | None = None,
    ) -> dict[str, Any]:
        """Raw runs of ``batch`` rows; by default as many side by side as the server has instances."""
        seconds = seconds or self.args.seconds
        callers = callers or self.instances
        feeds = tensor_batch(spec, batch, version_dir=version_dir)
        row = measure(session, feeds, seconds, gap_s, callers=callers)
        row["cpu_ms_per_item"] = row["cpu_ms_per_run"] / batch
        gaps = f" ({gap_s * 1e3:g} ms gaps)" if gap_s else ""
        gaps += f" x{callers}" if callers > 1 else ""
        print(
            f"  raw   batch {batch:>3}{gaps}: {row['items_per_s']:8.1f} items/s  p50 {row['p50_ms']:7.2f} ms"
            f"  p99 {row['p99_ms']:7.2f} ms",
            flush=True,
        )
        return row

    def load(self, server: ServerProcess, spec: ModelSpec, load: Load, label: str = "") -> dict[str, Any]:
        # CPU counters from the end of the warmup: the measured requests are charged their own work.
        start: dict[str, Any] = {}

        def open_window() -> None:
            start.update(client=time.process_time(), server=server.cpu_seconds(), roles=server.cpu_by_role())

        with PeakMemory(server) as memory:
            row = asyncio.run(run_load(server.target, spec, load, on_window=open_window))
        requests = row["requests_ok"] or 1
        served = requests * load.items
        row["server_cpu_ms_per_item"] = (server.cpu_seconds() - start["server"]) * 1e3 / served
        row["client_cpu_ms_per_item"] = (time.process_time() - start["client"]) * 1e3 / served
        # Where the server's CPU went, per answered request: the event loop against the model.
        row["server_cpu_ms_per_request"] = {
            role: (seconds - start["roles"][role]) * 1e3 / requests
            for role, seconds in server.cpu_by_role().items()
        }
        row["client_cpu_ms_per_request"] = row["client_cpu_ms_per_item"] * load.items
        row["peak_rss_mb"] = memory.peak_bytes / MB
        errors = {k: v for k, v in row["codes"].items() if k != "OK"}
        print(
            f"  {label or 'served':<6}{load.protocol}/{load.kind} "
            f"c={load.concurrency:<3} items={load.items:<3}"
            f" {row['items_per_s']:8.1f} items/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
            f"  server {row['server_cpu_ms_per_item']:.2f} cpu-ms/item"
            + (f"  errors {errors}" if errors else ""),
            flush=True,
        )
        return row

    def point(
        self,
        kind: str,
        concurrency: int,
        items: int = 1,
        *,
        protocol: str = "kserve",
        version_dir: Path | None = None,
        seconds: float | None = None,
        shared_memory: bool = False,
    ) -> Load:
        return Load(
            protocol=protocol,
            kind=kind,
            concurrency=concurrency,
            items=items,
            seconds=seconds or self.args.seconds,
            warmup_s=self.args.warmup,
            image_side=self.args.image_side,
            version_dir=version_dir,
            shared_memory=shared_memory,
            connections=min(concurrency, self.connections),
        )

    # --- one model ------------------------------------------------------------------------------

    def model(self, server: ServerProcess, name: str) -> dict[str, Any]:
        version_dir = (
            self.args.model_repository / name / str(max(list_versions(self.args.model_repository / name)))
        )
        spec = read_model_spec(version_dir)
        tokens = tensor_batch(spec, 1, version_dir=version_dir)
        print(f"\n== {name} v{spec.version} ({spec.task}, max batch {spec.max_batch_size})", flush=True)
        batch_sizes = sorted({b for b in self.args.batch_sizes if b <= spec.max_batch_size})
        spinning = self.args.spinning
        self.instances = self.args.instances or instance_count(server.target, name)
        self.threads = plan_threads(CPU, self.instances, self.args.threads).intra_op
        print(f"  {self.instances} instance(s) x {self.threads} thread(s), raw runs the same", flush=True)
        session = make_session(version_dir / spec.variant("fp32").file, "cpu", self.threads, 1, spinning)
        out: dict[str, Any] = {
            "version": spec.version,
            "task": spec.task,
            "threads": {"instances": self.instances, "intra_op": self.threads},
            "tokens_per_text": next(iter(tokens.values())).shape[1],
        }

        # Raw onnxruntime per batch size, while the server sits idle.
        out["raw"] = [self.raw(session, spec, b, version_dir) for b in batch_sizes]
        best = max(out["raw"], key=lambda r: r["items_per_s"])
        if (self.instances, self.threads) != (1, self.cores):
            # For reference: one run at a time over every core (what the server did before instances).
            spread = make_session(version_dir / spec.variant("fp32").file, "cpu", self.cores, 1, spinning)
            out["raw_one_run_all_cores"] = [
                self.raw(spread, spec, b, version_dir, callers=1) for b in (1, best["batch"])
            ]
            del spread

        # Latency at concurrency 1: raw batch 1 and served, in alternating short rounds, so both
        # sides see the same machine load; compared by the median over rounds.
        rounds = []
        stages_before = stage_totals(server.target, name)
        for _ in range(self.args.rounds):
            # One request at a time: one raw run at a time.
            raw1 = self.raw(session, spec, 1, version_dir, seconds=self.args.seconds / 2, callers=1)
            # The same runs with the session idle in between, as a server's session is at c=1.
            idle = self.raw(
                session, spec, 1, version_dir, seconds=self.args.seconds / 2, gap_s=IDLE_GAP_S, callers=1
            )
            load = self.point("tensor", 1, version_dir=version_dir, seconds=self.args.seconds / 2)
            served1 = self.load(server, spec, load)
            rounds.append(
                {
                    "raw_p50_ms": raw1["p50_ms"],
                    "raw_idle_gaps_p50_ms": idle["p50_ms"],
                    "served_p50_ms": served1["p50_ms"],
                    "served": served1,
                }
            )
        out["latency_c1"] = {
            "raw_p50_ms": median(r["raw_p50_ms"] for r in rounds),
            "served_p50_ms": median(r["served_p50_ms"] for r in rounds),
            "added_ms": median(r["served_p50_ms"] - r["raw_p50_ms"] for r in rounds),
            "idle_gap_ms": IDLE_GAP_S * 1e3,
            "raw_idle_gaps_p50_ms": median(r["raw_idle_gaps_p50_ms"] for r in rounds),
            "added_vs_idle_gaps_ms": median(r["served_p50_ms"] - r["raw_idle_gaps_p50_ms"] for r in rounds),
            # Inside the server (means, warmup requests included) and gRPC's floor (an empty call).
            "server_stages": mean_stage_ms(stages_before, stage_totals(server.target, name)),
            "empty_rpc_p50_ms": empty_rpc_p50_ms(server.target, self.args.seconds / 2),
            "rounds": rounds,
        }
        print(f"  inside the server at c=1: {out['latency_c1']['server_stages']}", flush=True)
        print(f"  empty RPC p50 {out['latency_c1']['empty_rpc_p50_ms']:.3f} ms", flush=True)

        # Throughput and latency against concurrency, ready tensors then encoded items.
        kinds = ["tensor"] if self.args.skip_bytes else ["tensor", "bytes"]
        out["concurrency"] = {
            kind: [
                self.load(server, spec, self.point(kind, c, version_dir=version_dir))
                for c in self.args.concurrency
            ]
            for kind in kinds
        }
        # Items per request (the client batches) against raw at the same batch size.
        in_flight = self.args.batch_concurrency or 2 * self.instances
        out["items_per_request"] = [
            self.load(server, spec, self.point("tensor", in_flight, b, version_dir=version_dir))
            for b in batch_sizes
        ]
        # Our fineserve.v1 API at concurrency 32, for comparison with KServe.
        out["fineserve_v1"] = {
            kind: self.load(
                server, spec, self.point(kind, 32, protocol="fineserve", version_dir=version_dir), "v1"
            )
            for kind in kinds
            if not (kind == "tensor" and spec.text is not None)  # AnalyzeSentiment takes texts only
        }
        # Saturation: the best served tensor configuration against raw at its best batch size,
        # over every configuration, and over one item per request (the server batches alone).
        every = out["concurrency"]["tensor"] + out["items_per_request"]
        out["saturation"] = self.saturation(
            server, session, spec, version_dir, raw_batch=best["batch"], points=every
        )
        single = out["concurrency"]["tensor"]
        out["saturation_single_item"] = self.saturation(
            server, session, spec, version_dir, raw_batch=best["batch"], points=single
        )
        # The best configuration again with its inputs in system shared memory: what a client on
        # the same host saves by not sending the tensors through gRPC.
        out["saturation_shared_memory"] = self.saturation(
            server, session, spec, version_dir, raw_batch=best["batch"], points=every, shared_memory=True
        )
        raw_best = out["saturation"]["raw_items_per_s"]
        out["preprocessing"] = measure_preprocessing(
            spec, version_dir, best["batch"], self.args.seconds, self.args.image_side
        )
        out["preprocessing"]["vs_model_raw_best"] = out["preprocessing"]["items_per_s"] / raw_best
        return out

    def saturation(
        self,
        server: ServerProcess,
        session: Any,
        spec: ModelSpec,
        version_dir: Path,
        *,
        raw_batch: int,
        points: list[dict[str, Any]],
        shared_memory: bool = False,
    ) -> dict[str, Any]:
        """The best of ``points`` measured again against raw at ``raw_batch`` in alternating rounds;
        compared by the median round ratio."""
        top = max(points, key=lambda r: r["items_per_s"])
        pairs = []
        for _ in range(self.args.rounds):
            raw_top = self.raw(session, spec, raw_batch, version_dir, seconds=self.args.seconds / 2)
            load = self.point(
                "tensor",
                top["concurrency"],
                top["items_per_request"],
                version_dir=version_dir,
                seconds=self.args.seconds / 2,
                shared_memory=shared_memory,
            )
            served_top = self.load(server, spec, load, "shm" if shared_memory else "")
            pairs.append(
                {
                    "raw_items_per_s": raw_top["items_per_s"],
                    "served_items_per_s": served_top["items_per_s"],
                    "raw_cpu_ms_per_item": raw_top["cpu_ms_per_item"],
                    "server_cpu_ms_per_request": served_top["server_cpu_ms_per_request"],
                    "client_cpu_ms_per_request": served_top["client_cpu_ms_per_request"],
                }
            )
        roles = pairs[0]["server_cpu_ms_per_request"]
        return {
            "raw_best_batch": raw_batch,
            "raw_items_per_s": median(p["raw_items_per_s"] for p in pairs),
            "served_items_per_s": median(p["served_items_per_s"] for p in pairs),
            "served_at": {"concurrency": top["concurrency"], "items_per_request": top["items_per_request"]},
            "ratio": median(p["served_items_per_s"] / p["raw_items_per_s"] for p in pairs),
            # The CPU budget of one served request at that point, against raw's per item.
            "cpu_ms_per_request": {
                role: median(p["server_cpu_ms_per_request"][role] for p in pairs) for role in roles
            },
            "client_cpu_ms_per_request": median(p["client_cpu_ms_per_request"] for p in pairs),
            "raw_cpu_ms_per_item": median(p["raw_cpu_ms_per_item"] for p in pairs),
            "rounds": pairs,
        }

    def batching_on_off(self, on: ServerProcess, off: ServerProcess, name: str) -> dict[str, Any]:
        version_dir = (
            self.args.model_repository / name / str(max(list_versions(self.args.model_repository / name)))
        )
        spec = read_model_spec(version_dir)
        kinds = ["tensor"] if self.args.skip_bytes else ["tensor", "bytes"]
        print(f"\n== {name}: dynamic batching on vs off at concurrency 32 (alternating rounds)", flush=True)
        result: dict[str, Any] = {}
        for kind in kinds:
            rounds: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
            for _ in range(self.args.rounds):
                for side, server in (("on", on), ("off", off)):
                    load = self.point(kind, 32, version_dir=version_dir, seconds=self.args.seconds / 2)
                    rounds[side].append(self.load(server, spec, load, side))
            result[kind] = {
                side: {
                    "items_per_s": median(r["items_per_s"] for r in rows),
                    "p50_ms": median(r["p50_ms"] for r in rows),
                    "p99_ms": median(r["p99_ms"] for r in rows),
                    "server_cpu_ms_per_item": median(r["server_cpu_ms_per_item"] for r in rows),
                    "rounds": rows,
                }
                for side, rows in rounds.items()
            }
        return result

    # --- the whole run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        out_dir: Path = self.args.out
        repository: Path = self.args.model_repository
        # At WARNING the server does not log the ports it binds: it is given free ones.
        ports = {"grpc_port": free_port(), "metrics_port": free_port()}
        with ServerProcess(repository, self.server_flags, out_dir / "server-batching.log", **ports) as server:
            seconds = server.start()
            time.sleep(1.0)  # let warmup allocations settle before reading idle memory
            self.results["server"] = {
                "flags": self.server_flags,
                "seconds_to_serving": seconds,
                "idle_rss_mb": server.rss_bytes() / MB,
            }
            print(
                f"server SERVING after {seconds:.2f} s, idle RSS {server.rss_bytes() / MB:.0f} MB", flush=True
            )
            for name in self.args.models:
                self.results["models"][name] = self.model(server, name)
            peak = max(
                r["peak_rss_mb"]
                for m in self.results["models"].values()
                for rows in m["concurrency"].values()
                for r in rows
            )
            self.results["server"]["peak_rss_under_load_mb"] = peak
            off_flags = [*self.server_flags, "--max-batch-size=1"]
            ports = {"grpc_port": free_port(), "metrics_port": free_port()}
            with ServerProcess(repository, off_flags, out_dir / "server-no-batching.log", **ports) as off:
                off.start()
                for name in self.args.models:
                    self.results["models"][name]["batching"] = self.batching_on_off(server, off, name)
        return self.results


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="fineserve bench suite", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--models", default="fashion,sentiment", help="comma-separated model names")
    parser.add_argument("--seconds", type=positive_seconds, default=3.0, help="measuring time per point")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured load before each point")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="alternating raw/served rounds for the latency and saturation ratios",
    )
    parser.add_argument("--concurrency", type=positive_ints, default=positive_ints("1,4,16,64,256"))
    parser.add_argument("--batch-sizes", type=positive_ints, default=positive_ints("1,8,32,64"))
    parser.add_argument(
        "--batch-concurrency",
        type=int,
        default=0,
        help="requests in flight per batch size; 0 = two per instance (one runs, one waits)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="server instances = raw runs side by side; 0 = each model's, as the server measures at load",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads; 0 = cores - instances + 1"
    )
    add_spinning_flag(parser)  # both sides
    parser.add_argument(
        "--workers",
        default="1",
        help="the server's --workers (N or auto); its CPU and memory figures include every worker",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="connections each load point spreads its requests over (at most its concurrency); "
        "0 = 1 with one worker, else 4 per worker",
    )
    parser.add_argument("--image-side", type=int, default=320, help="encoded JPEGs: width and height")
    parser.add_argument("--skip-bytes", action="store_true", help="tensors only: no encoded images/texts")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="JSON, tables and plots")
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["fineserve", "bench", "suite", *(sys.argv[2:] if argv is None else argv)])
    args.models = [m for m in args.models.split(",") if m]
    if not 0 < args.seconds <= 60 or not 0 <= args.warmup <= 10:
        parser.error("--seconds must be in (0, 60] and --warmup in [0, 10]")
    if args.instances < 0 or args.threads < 0 or args.batch_concurrency < 0:
        parser.error("--instances, --threads and --batch-concurrency must be >= 0")
    if args.workers != "auto" and not (args.workers.isdigit() and int(args.workers) >= 1):
        parser.error(f"--workers must be a positive number or auto, not {args.workers!r}")
    if args.connections < 0:
        parser.error("--connections must be >= 0")
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: not a folder")
    missing = [m for m in args.models if not list_versions(args.model_repository / m)]
    if missing:
        parser.error(f"not in {args.model_repository}: {', '.join(missing)} (run `make models`?)")

    started = time.perf_counter()
    results = Suite(args).run()
    results["suite_seconds"] = time.perf_counter() - started
    write_json(args.out / "suite.json", results)
    tables = write_tables(results, args.out / "suite.md")
    print("\n" + tables)
    for path in write_plots(results, args.out):
        print(f"wrote {path}")
    return 0
