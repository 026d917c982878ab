"""Seconds from process start to health SERVING, and resident memory once idle, for a repository.

    fineserve bench startup --model-repository models --runs 3

Starts ``python -m fineserve.server`` (every model of the repository, default settings) ``--runs`` times,
one after another, and prints each run and the median.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median

from fineserve.bench.server_process import ServerProcess
from fineserve.bench.stats import write_json
from fineserve.export.contract import list_models

MB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench startup", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    models = list_models(args.model_repository)
    if not models:
        parser.error(f"--model-repository {args.model_repository}: no models (run `make models`?)")
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            with ServerProcess(args.model_repository, [], Path(logs) / f"server-{run}.log") as server:
                seconds = server.start()
                time.sleep(1.0)  # let warmup allocations settle
                rows.append({"seconds_to_serving": seconds, "idle_rss_mb": server.rss_bytes() / MB})
            print(f"run {run + 1}: SERVING after {seconds:.2f} s, idle RSS {rows[-1]['idle_rss_mb']:.0f} MB")
    summary = {key: median(r[key] for r in rows) for key in ("seconds_to_serving", "idle_rss_mb")}
    print(
        f"{', '.join(models)}: median {summary['seconds_to_serving']:.2f} s to SERVING, "
        f"idle RSS {summary['idle_rss_mb']:.0f} MB"
    )
    write_json(args.json, {"benchmark": "startup", "models": models, "runs": rows, **summary})
    return 0
