"""Transferability scores against reality (not a test): does ``fineserve train rank`` order the
candidate backbones the way fine-tuning them does?

    fineserve bench transfer --out bench/results/transfer-cpu            # CPU-sized
    fineserve bench transfer --size gpu --device cuda --out bench/results/transfer-gpu

For each dataset: every candidate scored from frozen features (``training/rank.py``: LogME, LEEP,
the ridge probe's accuracy), then fine-tuned with one fixed recipe (the same for every candidate
of that dataset: ``--size cpu`` trains the images' last 6 blocks on cached frozen outputs,
``gpu`` every layer), then Kendall's tau-b between each score and the test accuracies. LEEP needs a
source head, so its tau covers the pretrained candidates only. Writes ``transfer.json`` (every
score, accuracy, time and tau) and ``transfer.md``; the ranking JSON per dataset (reused when it
scored every candidate on this size's sample) and the runs' folders are kept in ``OUT``, so an
interrupted study carries on with the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fineserve.bench.labels import TASKS
from fineserve.bench.study import (
    StudyRun,
    add_study_options,
    chosen,
    run_study,
    side_by_side,
    threads_per_run,
)

SCORES = ("logme", "leep", "probe_accuracy")
DIGITS = [str(i) for i in range(10)]


def fixed_recipe(task: str, **changes: Any) -> dict[str, Any]:
    """The label study's recipe for ``task`` (full fine-tuning at the fashion-full/sentiment-full
    rates), less what each candidate sets: its backbone and input size."""
    recipe = {k: v for k, v in TASKS[task].items() if k not in ("backbone", "image_size")}
    return {**recipe, "strategy": "full", **changes}


# One fine-tuning recipe per dataset, for every candidate. Flips only where they keep the label
# (clothes, not digits).
DATASETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": fixed_recipe("fashion"),
    "mnist-subset": fixed_recipe("fashion", dataset="mnist-subset", labels=DIGITS, hflip=False),
    "rotten-tomatoes": fixed_recipe("sentiment"),
}
TEXT_CANDIDATES = ("minilm-l6", "minilm-l6:3", "minilm-l6+random")


@dataclass(frozen=True)
class Size:
    image_candidates: tuple[str, ...]
    text_candidates: tuple[str, ...]
    rank_samples: int
    train: int | None  # fine-tuning examples (None: the whole training split)
    val: int | None
    test: int | None
    epochs: int | None = None  # None: the dataset recipe's
    # Changes to the image recipes at this size (the text recipe trains everything at every size).
    image_changes: tuple[tuple[str, Any], ...] = ()


# On a CPU the images fine-tune as the quick recipes do: the last 6 blocks (of 18) and the head, on
# cached outputs of the frozen rest (cache_frozen); full fine-tuning of seven candidates at 112 px
# would take hours on two cores.
PARTIAL = (("strategy", "partial"), ("trainable_blocks", 6), ("cache_frozen", True))


def lite_candidates(sizes: tuple[str, ...], random: str) -> tuple[str, ...]:
    """Lite0, Lite1 and Lite2 at each of ``sizes`` (suffixes such as "@112"), then ``random``."""
    return (*(f"efficientnet-lite{v}{s}" for v in (0, 1, 2) for s in sizes), random)


SIZES = {
    # Lite0/1/2 at two sizes a CPU fine-tunes in minutes, and a random-init Lite0
    "cpu": Size(
        lite_candidates(("@64", "@112"), "efficientnet-lite0+random@64"),
        TEXT_CANDIDATES,
        rank_samples=2000,
        train=2000,
        val=200,
        test=1000,
        image_changes=PARTIAL,
    ),
    # the same at each backbone's own size (224/240/260) and 112, the whole splits
    "gpu": Size(
        lite_candidates(("", "@112"), "efficientnet-lite0+random"),
        TEXT_CANDIDATES,
        rank_samples=2000,
        train=None,
        val=2000,
        test=None,
    ),
    # the tests' size: three candidates of each kind, a few examples
    "smoke": Size(
        ("efficientnet-lite0@32", "efficientnet-lite1@32", "efficientnet-lite0+random@32"),
        ("minilm-l6:1", "minilm-l6:2", "minilm-l6:1+random"),
        rank_samples=1400,  # LogME needs more examples than features (1,280), or they fit any labels
        train=60,
        val=20,
        test=40,
        epochs=1,
        image_changes=PARTIAL,
    ),
}


def candidates_for(dataset: str, size: Size) -> tuple[str, ...]:
    return size.text_candidates if dataset == "rotten-tomatoes" else size.image_candidates


def finetune_recipe(dataset: str, spec: str, size: Size, *, device: str, threads: int) -> dict[str, Any]:
    """The dataset's fixed recipe with the candidate's backbone, weights and input size."""
    from fineserve.training.rank import parse_candidate

    candidate = parse_candidate(spec)
    recipe = {
        **DATASETS[dataset],
        "backbone": candidate.backbone,
        "pretrained": candidate.pretrained,
        "train_samples": size.train,
        "val_samples": size.val,
        "test_samples": size.test,
        "seed": 0,
        "device": device,
        "threads": threads,
        "log_every": 0,
    }
    if dataset != "rotten-tomatoes":
        recipe.update(size.image_changes)
    if candidate.image_size is not None:
        recipe["image_size"] = candidate.image_size
    if candidate.num_layers is not None:
        recipe["num_layers"] = candidate.num_layers
    if size.epochs is not None:
        recipe["epochs"] = size.epochs
    return recipe


def run_name(dataset: str, spec: str) -> str:
    return f"{dataset}-{spec.replace('@', '-').replace(':', '-l').replace('+', '-')}"


def scored(dataset: str, size: Size, out: Path, *, device: str) -> dict[str, dict[str, Any]]:
    """``fineserve train rank`` on the dataset, or its JSON from an earlier run of this study."""
    from fineserve.training.rank import build_parser, rank

    path = out / f"rank-{dataset}.json"
    wanted = candidates_for(dataset, size)
    if path.is_file():
        kept = json.loads(path.read_text())
        if reusable(kept, wanted, size.rank_samples):
            print(f"{dataset}: using the scores in {path}", flush=True)
            return {spec: kept[spec] for spec in wanted}
    argv = ["--data", dataset, "--candidates", ",".join(wanted), "--samples", str(size.rank_samples)]
    argv += ["--device", device, "--json", str(path), "--no-progress"]
    print(f"{dataset}: fineserve train rank {' '.join(argv)}", flush=True)
    return rank(build_parser().parse_args(argv))


def reusable(kept: dict[str, dict[str, Any]], wanted: tuple[str, ...], samples: int) -> bool:
    """Whether an earlier ranking scored every wanted candidate on ``samples`` examples (every
    dataset here holds more than a size asks for, so a ranking of fewer came from another size)."""
    return all(kept.get(spec, {}).get("examples") == samples for spec in wanted)


def taus(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Kendall's tau-b of each score against test accuracy, over the candidates that have both,
    and over the pretrained ones alone (a random-init candidate last on both sides adds easy
    agreeing pairs; the choice a user makes is between pretrained backbones)."""
    from fineserve.training.errors import ScoringError
    from fineserve.training.rank import RANDOM_SUFFIX
    from fineserve.training.transferability import kendall_tau

    def tau_of(score: str, specs: list[str]) -> tuple[float | None, int]:
        both = [
            rows[s]
            for s in specs
            if rows[s].get(score) is not None and rows[s].get("test_accuracy") is not None
        ]
        try:
            return kendall_tau([r[score] for r in both], [r["test_accuracy"] for r in both]), len(both)
        except ScoringError:  # fewer than two candidates, or all tied: no order to compare
            return None, len(both)

    pretrained = [spec for spec in rows if RANDOM_SUFFIX not in spec]
    out: dict[str, dict[str, Any]] = {}
    for score in SCORES:
        tau, count = tau_of(score, list(rows))
        tau_pretrained, count_pretrained = tau_of(score, pretrained)
        out[score] = {
            "tau": tau,
            "candidates": count,
            "tau_pretrained": tau_pretrained,
            "pretrained_candidates": count_pretrained,
        }
    return out


def table(results: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = []
    for dataset, result in results.items():
        lines += [
            f"**{dataset}**",
            "",
            "| candidate | LogME | LEEP | probe accuracy | rank s | fine-tuned test accuracy | fine-tune s |",
            "|---|---|---|---|---|---|---|",
        ]
        for spec, row in result["candidates"].items():
            accuracy = row.get("test_accuracy")
            scores = " | ".join(number(row[score]) for score in SCORES)
            lines.append(
                f"| {spec} | {scores} | "
                f"{row['seconds']:.0f} | {'-' if accuracy is None else f'{100 * accuracy:.2f}%'} | "
                f"{number(row.get('finetune_seconds'), 0)} |"
            )
        tau = result["tau"]
        every = ", ".join(
            f"{score} {number(tau[score]['tau'], 2)} ({tau[score]['candidates']})" for score in SCORES
        )
        pretrained = ", ".join(
            f"{score} {number(tau[score]['tau_pretrained'], 2)} ({tau[score]['pretrained_candidates']})"
            for score in SCORES
        )
        lines += [
            "",
            f"Kendall's tau against fine-tuned accuracy (candidates): {every}; "
            f"the pretrained candidates alone: {pretrained}",
            "",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve bench transfer",
        description="Rank candidate backbones from frozen features, fine-tune each with one fixed recipe, "
        "and report Kendall's tau between each score and the fine-tuned test accuracy.",
    )
    add_study_options(parser, writes="transfer.json/.md, the scores", sizes=SIZES)
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"[{','.join(DATASETS)}]")
    return parser


def main(argv: list[str] | None = None) -> int:
    from fineserve.training.errors import TrainingError

    args = build_parser().parse_args(argv)
    try:
        datasets = chosen(args.datasets, DATASETS, "--datasets")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = SIZES[args.size]
    parallel = side_by_side(args)
    started = time.perf_counter()
    try:
        scores = {dataset: scored(dataset, size, args.out, device=args.device) for dataset in datasets}
        runs = [
            StudyRun(
                run_name(dataset, spec),
                finetune_recipe(dataset, spec, size, device=args.device, threads=threads_per_run(parallel)),
                cost=scores[dataset][spec]["seconds"],  # the dearer features, the dearer fine-tuning
            )
            for dataset in datasets
            for spec in candidates_for(dataset, size)
        ]
        metrics = run_study(runs, args.out, parallel=parallel, log=lambda line: print(line, flush=True))
    except TrainingError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    for dataset in datasets:
        rows = {}
        for spec in candidates_for(dataset, size):
            done = metrics.get(run_name(dataset, spec), {})
            rows[spec] = {
                **scores[dataset][spec],
                "test_accuracy": done.get("test_accuracy"),
                "finetune_seconds": done.get("wall_time_s"),
            }
        results[dataset] = {"candidates": rows, "tau": taus(rows)}
    record = {
        "command": "fineserve bench transfer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "recipes": DATASETS,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer.json").write_text(json.dumps(record, indent=2) + "\n")
    markdown = table(results)
    (args.out / "transfer.md").write_text(
        f"`{record['command']}` ({record['wall_time_s']:.0f} s)\n\n{markdown}\n"
    )
    print(markdown)
    return 0 if len(metrics) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
