"""fineserve bench: benchmarks that print their figures and write JSON (not tests).

    fineserve bench raw   --model-dir models/fashion/1 ...   raw onnxruntime session.run
    fineserve bench load  --target 127.0.0.1:8001 ...        load generator against a server
    fineserve bench suite --model-repository models ...     the server against raw onnxruntime, all figures
    fineserve bench cores --workers 1,2 --out cores.json    throughput against concurrency, by workers
    fineserve bench floor --json floor.json                 gRPC's own CPU per request beside the server's
    fineserve bench startup --model-repository models       seconds to SERVING, idle memory
    fineserve bench train ...                               the training results table
    fineserve bench labels --out bench/results/labels-cpu   label efficiency: pretrained vs random init
    fineserve bench transfer --out bench/results/transfer-cpu  rank scores against fine-tuning (tau)
    fineserve bench newcomer --json FILE                    the README's two commands on a fresh clone
    fineserve bench gpu --out bench/results/gpu/h100.json  the GPU check, in a time budget

Every claim is a ratio measured in one run: run `raw` and `load` on the same machine, back to back.
"""

from __future__ import annotations

import importlib
import sys

from fineserve.cli import chosen, listing
from fineserve.export.contract import ModelSpecError

COMMANDS = {
    "raw": ("fineserve.bench.raw_ort", "raw onnxruntime throughput and latency per batch size"),
    "load": (
        "fineserve.bench.loadgen",
        "concurrent gRPC load against a running server (KServe v2 or fineserve.v1)",
    ),
    "suite": (
        "fineserve.bench.suite",
        "start the server and measure it against raw onnxruntime (every figure)",
    ),
    "cores": (
        "fineserve.bench.cores",
        "requests/s against requests in flight, by worker count (near-free model; --pinned)",
    ),
    "floor": (
        "fineserve.bench.grpc_floor",
        "gRPC's own cost per request (bare grpc.aio, grpc sync) beside the server's",
    ),
    "stream": ("fineserve.bench.stream_compare", "KServe unary calls against one open stream per client"),
    "startup": ("fineserve.bench.startup", "seconds from process start to health SERVING, idle memory"),
    "train": ("fineserve.bench.train_results", "train the result recipes and print the accuracy table"),
    "labels": (
        "fineserve.bench.labels",
        "accuracy against the share of labelled examples: fine-tune, probe, random init (3 seeds)",
    ),
    "transfer": (
        "fineserve.bench.transfer",
        "transferability scores against fine-tuned accuracy (Kendall's tau), per dataset",
    ),
    "newcomer": ("fineserve.bench.newcomer", "a fresh clone: make serve until SERVING, predict, make test"),
    "gpu": ("fineserve.bench.gpu", "the GPU check: raw onnxruntime at its best against the served models"),
}


def _usage() -> str:
    lines = ["usage: fineserve bench {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [__doc__.strip().splitlines()[0], "", *listing(COMMANDS)]
    lines.append("\nRun `fineserve bench COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    picked = chosen(args, COMMANDS, _usage(), "error: unknown benchmark {name}; choose one of: {names}")
    if isinstance(picked, int):
        return picked
    name, rest = picked
    module = importlib.import_module(COMMANDS[name][0])
    try:
        result: int = module.main(rest)
    except (ModelSpecError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
