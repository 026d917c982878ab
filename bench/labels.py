"""Label efficiency (not a test): what pretraining buys when few examples are labelled.

    fineserve bench labels --out bench/results/labels-cpu       # the grid: within 30 minutes on 2 cores
    fineserve bench labels --methods finetune,probe,random,lpft --out bench/results/labels-cpu  # + lpft
    fineserve bench labels --size gpu --device cuda --out bench/results/labels-gpu

For each task, a pool of training examples (``--size cpu``: a seeded 1,000; ``gpu``: the whole
training split) of which 1%, 5%, 10% and 100% keep their labels (``train_fraction``: a seeded
draw, the 1% inside the 5% and so on). On those, one fixed recipe per task, four ways (the
first three by default, ``--methods`` chooses):

- ``finetune``: the pretrained backbone, every layer trains (strategy full);
- ``probe``: the pretrained backbone frozen, a linear head on its cached features;
- ``random``: the finetune recipe from random weights (what pretraining is measured against);
- ``lpft``: finetune after head-only epochs (``head_warmup_epochs``, the few-label option), at
  1% and 10% of the labels.

Each point is 3 seeds (the seed draws the pool, the labelled part, validation and test, and the
new head). Small fractions get more epochs, so every run takes at least ``Size.min_steps``
optimiser steps; each validates about ``Size.validations`` times (``eval_every_epochs``).
Writes ``labels.json`` (every run and each point's mean, standard deviation, min and max),
``labels.md`` (the tables) and ``labels.png`` (accuracy against labelled examples, log axis),
written once the runs end; the runs' folders are in ``OUT/runs`` (an interrupted study
carries on with the same command, and one with more ``--methods`` trains only what is new).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fineserve.bench.study import (
    StudyRun,
    add_study_options,
    chosen,
    run_study,
    side_by_side,
    spread,
    threads_per_run,
)

FRACTIONS = (0.01, 0.05, 0.1, 1.0)
METHODS = ("finetune", "probe", "random", "lpft")
GRID = ("finetune", "probe", "random")  # the label-efficiency grid; lpft is the few-label option's measure
SEEDS = (0, 1, 2)

FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]  # fmt: skip
# One recipe per task for every method (the GPU recipes fashion-full and sentiment-full, at CPU size).
TASKS: dict[str, dict[str, Any]] = {
    "fashion": {
        "backbone": "efficientnet-lite0",
        "dataset": "fashion-mnist",
        "labels": FASHION_LABELS,
        "image_size": 64,
        "layer_decay": 0.9,
        "epochs": 3,
        "batch_size": 32,
        "lr": 6.0e-4,
        "head_lr": 2.0e-3,
        "weight_decay": 0.05,
        "warmup_fraction": 0.05,
        "schedule": "cosine",
        "label_smoothing": 0.1,
        "hflip": True,
    },
    "sentiment": {
        "backbone": "minilm-l6",
        "dataset": "rotten-tomatoes",
        "labels": ["rotten", "fresh"],
        "max_length": 64,
        "group_by_length": True,
        "layer_decay": 0.9,
        "epochs": 2,
        "batch_size": 32,
        "lr": 1.0e-4,
        "head_lr": 1.0e-3,
        "weight_decay": 0.01,
        "warmup_fraction": 0.1,
        "schedule": "linear",
    },
}
# The probe's head trains on cached features: the probe recipes' rates (fashion-probe, sentiment-probe).
PROBE = {
    "fashion": {"head_lr": 3.0e-3, "weight_decay": 1.0e-4, "warmup_fraction": 0.0, "label_smoothing": 0.0},
    "sentiment": {"head_lr": 1.0e-2, "weight_decay": 1.0e-4, "warmup_fraction": 0.0},
}


@dataclass(frozen=True)
class Size:
    pool: int | None  # training examples the fractions are taken of (None: the whole split)
    val: int | None
    test: int | None
    fractions: tuple[float, ...] = FRACTIONS
    lpft_fractions: tuple[float, ...] = (0.01, 0.1)
    seeds: tuple[int, ...] = SEEDS
    image_size: int | None = None  # None: the task's
    num_layers: int | None = None  # text: None keeps all 6
    # Fewer labels, more epochs: even 1% gets min_steps optimiser steps (cut at max_epochs).
    min_steps: int = 60
    max_epochs: int = 40
    probe_min_steps: int = 200  # a probe's step costs next to nothing (cached features)
    probe_max_epochs: int = 200
    # Each run validates (and saves) about this many times, not after each of 40 one-step epochs.
    validations: int = 5


SIZES = {
    # Sized to finish within 30 minutes on a 2-core VM (the grid: 26 minutes; lpft adds about 4)
    "cpu": Size(pool=1000, val=200, test=500, min_steps=30, validations=3),
    "gpu": Size(pool=None, val=2000, test=None, image_size=112),
    # the tests' size: every method and fraction path, in about a minute
    "smoke": Size(
        pool=200,
        val=20,
        test=40,
        fractions=(0.1, 1.0),
        lpft_fractions=(0.1,),
        seeds=(0,),
        image_size=32,
        num_layers=1,
        min_steps=4,
        max_epochs=3,
        probe_min_steps=4,
        probe_max_epochs=3,
    ),
}


def epochs_for(examples: int, batch_size: int, base: int, min_steps: int, max_epochs: int) -> int:
    """``base`` epochs, or more when that many would take fewer than ``min_steps`` steps."""
    steps_per_epoch = math.ceil(examples / batch_size)
    return max(base, min(max_epochs, math.ceil(min_steps / steps_per_epoch)))


def pool_size(task: str, size: Size, seed: int) -> int:
    """Training examples before ``train_fraction``: the split's, as the run will draw it."""
    from fineserve.training.config import build_config
    from fineserve.training.data import make_splits
    from fineserve.training.datasets import default_cache_dir, load_dataset

    cfg = build_config({**TASKS[task], "seed": seed, "train_samples": size.pool})
    raw = load_dataset(
        cfg.dataset, data_path=None, cache=default_cache_dir(), text_column="", label_column=""
    )
    return int(make_splits(raw, cfg, lambda _raw, index: index).record["train"])


def study_runs(
    pools: dict[str, int], size: Size, methods: list[str], *, device: str, threads: int
) -> list[StudyRun]:
    """Every run of the study; ``pools`` maps each task to its pool size (``pool_size``)."""
    runs = []
    for task, pool in pools.items():
        base = TASKS[task]
        sized: dict[str, Any] = {
            "train_samples": size.pool,
            "val_samples": size.val,
            "test_samples": size.test,
        }
        if size.image_size and "image_size" in base:
            sized["image_size"] = size.image_size
        if size.num_layers and "max_length" in base:
            sized["num_layers"] = size.num_layers
        for fraction in size.fractions:
            examples = round(fraction * pool)
            epochs = epochs_for(examples, base["batch_size"], base["epochs"], size.min_steps, size.max_epochs)
            probe_epochs = epochs_for(
                examples, base["batch_size"], base["epochs"], size.probe_min_steps, size.probe_max_epochs
            )
            ways: dict[str, dict[str, Any]] = {
                "finetune": {"strategy": "full", "epochs": epochs},
                "probe": {"strategy": "linear-probe", "epochs": probe_epochs, **PROBE[task]},
                "random": {"strategy": "full", "pretrained": False, "epochs": epochs},
            }
            if fraction in size.lpft_fractions:
                # a third of the epochs head-only, then the whole network (LP-FT)
                ways["lpft"] = {
                    "strategy": "full",
                    "epochs": epochs,
                    "head_warmup_epochs": max(1, epochs // 3),
                }
            for method, changes in ways.items():
                if method not in methods:
                    continue
                cost = 0.05 if method == "probe" else examples * epochs
                eval_every = math.ceil(changes["epochs"] / size.validations)
                for seed in size.seeds:
                    recipe = {
                        **base,
                        **sized,
                        "train_fraction": fraction,
                        **changes,
                        "eval_every_epochs": eval_every,
                        "seed": seed,
                        "device": device,
                        "threads": threads,
                        "log_every": 0,
                    }
                    runs.append(StudyRun(run_name(task, method, fraction, seed), recipe, cost))
    return runs


def run_name(task: str, method: str, fraction: float, seed: int) -> str:
    return f"{task}-{method}-{fraction:g}-s{seed}"


def summarise(pools: dict[str, int], size: Size, metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per task, method and fraction: the seeds' test accuracies and their spread."""
    points = []
    for task, pool in pools.items():
        for method in METHODS:
            for fraction in size.fractions:
                names = [run_name(task, method, fraction, seed) for seed in size.seeds]
                done = [metrics[n] for n in names if n in metrics]
                if not done:
                    continue
                accuracy = [m["test_accuracy"] for m in done]
                points.append(
                    {
                        "task": task,
                        "method": method,
                        "fraction": fraction,
                        "labelled": round(fraction * pool),
                        "test_accuracy": spread(accuracy),
                        "seeds": [size.seeds[i] for i, n in enumerate(names) if n in metrics],
                        "per_seed": accuracy,
                        "epochs_run": [m["epochs_run"] for m in done],
                        "optimizer_steps": [m["optimizer_steps"] for m in done],
                        "wall_time_s": sum(m["wall_time_s"] for m in done),
                    }
                )
    return points


def point(points: list[dict[str, Any]], task: str, method: str, fraction: float) -> dict[str, Any] | None:
    return next(
        (p for p in points if (p["task"], p["method"], p["fraction"]) == (task, method, fraction)), None
    )


def gaps(points: list[dict[str, Any]], tasks: list[str], fractions: tuple[float, ...]) -> dict[str, Any]:
    """Points of accuracy that pretraining (finetune - random) and the head-only warm-up
    (lpft - finetune) add, by task and fraction: the differences of the seeds' means."""
    out: dict[str, Any] = {}
    for task in tasks:
        for fraction in fractions:
            ft, rnd, lpft = (point(points, task, m, fraction) for m in ("finetune", "random", "lpft"))
            key = f"{task}@{fraction:g}"
            if ft and rnd:
                out.setdefault("pretraining", {})[key] = 100 * (
                    ft["test_accuracy"]["mean"] - rnd["test_accuracy"]["mean"]
                )
            if ft and lpft:
                out.setdefault("head_warmup", {})[key] = 100 * (
                    lpft["test_accuracy"]["mean"] - ft["test_accuracy"]["mean"]
                )
    return out


def table(points: list[dict[str, Any]], tasks: list[str], fractions: tuple[float, ...]) -> str:
    """Markdown: one row per task and method, one column per fraction (mean ± std over seeds)."""
    header = "| task | method | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |"
    lines = [header, "|" + "---|" * (2 + len(fractions))]
    for task in tasks:
        for method in METHODS:
            cells = []
            for fraction in fractions:
                p = point(points, task, method, fraction)
                acc = p["test_accuracy"] if p else None
                cells.append(
                    f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f} ({p['labelled']})" if p else ""
                )
            if any(cells):
                lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in METHODS:
            mine = sorted(
                (p for p in points if p["task"] == task and p["method"] == method),
                key=lambda p: p["labelled"],
            )
            if not mine:
                continue
            ax.errorbar(
                [p["labelled"] for p in mine],
                [100 * p["test_accuracy"]["mean"] for p in mine],
                yerr=[100 * p["test_accuracy"]["std"] for p in mine],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xscale("log")
        ax.set(xlabel="labelled training examples (log)", ylabel="test accuracy (%)", title=task)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Label efficiency: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve bench labels",
        description="Accuracy against the share of labelled training examples: fine-tuning, a linear probe "
        "and random init (and with --methods, fine-tuning after a head-only warm-up), 3 seeds each.",
    )
    add_study_options(parser, writes="labels.json/.md/.png", sizes=SIZES)
    parser.add_argument("--tasks", default="fashion,sentiment", help="[fashion,sentiment]")
    parser.add_argument(
        "--methods",
        default=",".join(GRID),
        help=f"[{','.join(GRID)}]; add lpft to fine-tune after a head-only warm-up at 1%% and 10%% of the "
        "labels (runs already finished in --out are reused; the tables show the methods named)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from fineserve.export.defaults import usable_cores
    from fineserve.training.errors import TrainingError

    args = build_parser().parse_args(argv)
    try:
        tasks = chosen(args.tasks, TASKS, "--tasks")
        methods = chosen(args.methods, METHODS, "--methods")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = SIZES[args.size]
    parallel = side_by_side(args)
    threads = threads_per_run(parallel)
    started = time.perf_counter()
    try:
        # loaded once: the pool sizes set the epochs of the runs and the labelled counts reported
        pools = {task: pool_size(task, size, size.seeds[0]) for task in tasks}
        runs = study_runs(pools, size, methods, device=args.device, threads=threads)
        print(f"labels: {len(runs)} runs, {parallel} side by side, into {args.out}", flush=True)
        metrics = run_study(runs, args.out, parallel=parallel, log=lambda line: print(line, flush=True))
        points = summarise(pools, size, metrics)
    except TrainingError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    result = {
        "command": "fineserve bench labels " + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size,
        "machine": f"{platform.machine()}, {usable_cores()} usable cores",
        "parallel": parallel,
        # this command's wall time (finished runs are reused, not trained again), and the runs' own
        "wall_time_s": round(time.perf_counter() - started, 1),
        "run_seconds_total": round(sum(m["wall_time_s"] for m in metrics.values()), 1),
        "methods": methods,
        "runs": len(runs),
        "finished": len(metrics),
        "points": points,
        "gaps_points": gaps(points, tasks, size.fractions),
        "recipes": TASKS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "labels.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = table(points, tasks, size.fractions)
    (args.out / "labels.md").write_text(
        f"`{result['command']}`: test accuracy (%), mean ± std over seeds (labelled examples)\n\n{markdown}\n"
    )
    plot(points, tasks, args.out / "labels.png")
    print(markdown)
    print(f"gaps (points): {json.dumps(result['gaps_points'])}")
    print(f"wall time {result['wall_time_s']} s; {args.out}/labels.json, labels.md, labels.png")
    return 0 if len(metrics) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
