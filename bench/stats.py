"""Small helpers shared by the benchmarks: percentiles, JSON results, argument types."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds (NaN when empty)."""
    if not latencies_s:
        return dict.fromkeys(("p50_ms", "p90_ms", "p99_ms", "mean_ms"), float("nan"))
    ms = np.asarray(latencies_s) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean())}


def machine() -> dict[str, Any]:
    import os

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers, each at least 1 ("1,8,32")."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_seconds(text: str) -> float:
    """An argparse type: a duration in seconds, over 0 and at most an hour."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 3600], got {text!r}")
    return value
