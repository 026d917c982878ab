"""The README's two commands as a newcomer runs them: a fresh clone, ``make serve``, ``make test``.

    fineserve bench newcomer --json bench/results/newcomer.json           # from a checkout's root

Clones the checkout's HEAD into a new folder, runs ``make serve`` there (install, default models,
server) until health says SERVING on the given port, calls the served models with ``fineserve
predict``, stops it, then runs ``make test`` (unless ``--no-test``). Prints and writes the wall
time of each command, the commit, the pytest summary line, and what export published for each
default model (accuracy; size, CPU latency and checks per variant). Takes tens of minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fineserve.bench.server_process import FAST_RECONNECT, free_port, wait_serving
from fineserve.bench.stats import write_json
from fineserve.export.contract import list_models, list_versions, read_model_spec

_SUMMARY = re.compile(r"^=+ (.* in [0-9.]+s.*?) =+$", re.MULTILINE)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def make_serve(clone: Path, port: int, log: Path, timeout_s: float) -> dict[str, Any]:
    """``make serve`` in ``clone`` until SERVING; then one predict per model; then SIGTERM."""
    import grpc

    command = ["make", "serve", f"GRPC_PORT={port}", f"METRICS_PORT={free_port()}"]
    started = time.perf_counter()
    with log.open("w") as out:
        # Its own process group: make, the trainings and the server stop together.
        process = subprocess.Popen(
            command, cwd=clone, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

        def alive() -> None:
            if process.poll() is not None:
                raise RuntimeError(f"make serve exited with {process.returncode}; see {log}")

        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
                try:
                    wait_serving(channel, timeout_s, alive=alive)
                except TimeoutError:
                    raise RuntimeError(f"not SERVING after {timeout_s:.0f} s; see {log}") from None
            seconds = time.perf_counter() - started
            print(f"make serve: SERVING after {seconds:.0f} s", flush=True)
            predictions = _predict_each(clone, port)
        finally:
            with contextlib.suppress(ProcessLookupError):  # make exited already
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
    return {"command": " ".join(command), "seconds_to_serving": round(seconds, 1), "predict": predictions}


def _predict_each(clone: Path, port: int) -> dict[str, Any]:
    """``fineserve predict`` on each default model, as the README's quick start does."""
    fineserve = clone / ".venv" / "bin" / "fineserve"
    cat = clone / "cat.jpg"
    save_cat = (
        f"from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save({str(cat)!r})"
    )
    subprocess.run([clone / ".venv/bin/python", "-c", save_cat], check=True)
    calls = {
        "imagenet": [str(cat)],
        "sentiment": ["a warm, funny film", "a dull, tedious mess"],
    }
    answers: dict[str, Any] = {}
    for model, inputs in calls.items():
        done = subprocess.run(
            [fineserve, "predict", "--url", f"127.0.0.1:{port}", "--model", model, "--top-k", "3", "--json",
             *inputs],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        answers[model] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()}
        print(f"fineserve predict --model {model}: {answers[model]}", flush=True)
    return answers


def published_models(repository: Path) -> dict[str, Any]:
    """What export published for each default model (its newest version): test accuracy, and per
    variant its size, CPU latency and validation checks (the README's export figures)."""
    models: dict[str, Any] = {}
    for name in list_models(repository):
        version = max(list_versions(repository / name))
        spec = read_model_spec(repository / name / str(version))
        models[name] = {
            "version": version,
            "test_accuracy": spec.source.get("metrics", {}).get("test_accuracy"),
            "variants": {
                variant_name: {
                    "size_bytes": variant.size_bytes,
                    "cpu_latency_ms": variant.cpu_latency_ms,
                    "checks": variant.checks,
                }
                for variant_name, variant in spec.variants.items()
            },
        }
    return models


def make_test(clone: Path, log: Path) -> dict[str, Any]:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["make", "test"], cwd=clone, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    summaries = _SUMMARY.findall(log.read_text())
    print(f"make test: exit {done.returncode} after {seconds:.0f} s: {summaries[-1] if summaries else '?'}")
    return {"command": "make test", "exit": done.returncode, "seconds": round(seconds, 1),
            "pytest": summaries[-1] if summaries else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineserve bench newcomer", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the checkout to clone (its HEAD)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to clone (default: a temp folder)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port for make serve (default: a free one)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up on SERVING after this long")
    parser.add_argument("--no-test", action="store_true", help="skip make test")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.repo / ".git").exists():
        parser.error(f"--repo {args.repo}: not a git checkout")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir}: not empty")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fineserve-newcomer-"))
    clone = workdir / "fineserve"
    try:
        subprocess.run(["git", "clone", "--quiet", str(args.repo.resolve()), str(clone)], check=True)
        result: dict[str, Any] = {
            "benchmark": "newcomer",
            "commit": _git(clone, "rev-parse", "--short", "HEAD"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "clone": str(clone),
        }
        print(f"fresh clone of {result['commit']} in {clone}", flush=True)
        port = args.port or free_port()
        result["make_serve"] = make_serve(clone, port, workdir / "make-serve.log", args.timeout_s)
        result["models"] = published_models(clone / "models")
        if not args.no_test:
            result["make_test"] = make_test(clone, workdir / "make-test.log")
    except (RuntimeError, subprocess.SubprocessError) as err:
        print(f"fineserve bench newcomer: {err}".splitlines()[0], file=sys.stderr)
        return 1
    write_json(args.json, result)
    failed = [m for m, answer in result["make_serve"]["predict"].items() if isinstance(answer, dict)]
    if failed:
        print(f"fineserve bench newcomer: predict failed for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or result.get("make_test", {}).get("exit", 0) else 0
