"""``fineserve train rank``: score candidate backbones on a dataset from frozen features, no training.

    fineserve train rank --data fashion-mnist \\
        --candidates efficientnet-lite0@112,efficientnet-lite0+random@112 --json rank.json

For each candidate: the backbone's features (what a new head would see) for every example, then
LogME, LEEP (from the ImageNet head's predictions; null without a pretrained source head) and a
k-fold ridge probe's accuracy (``training/transferability.py``); a table with the wall time each
took, and the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fineserve.training.errors import ConfigError, DatasetError, ScoringError, TrainingError

# The datasets a recipe names by themselves (training/config.py DATASETS, less the two that need a path).
NAMED_DATASETS = ("fashion-mnist", "mnist-subset", "digits", "rotten-tomatoes")
RANDOM_SUFFIX = "+random"
# How many encoder layers a text backbone has: a longer cut would add randomly initialised layers.
ENCODER_LAYERS = {"minilm-l6": 6}
DESCRIPTION = """Score candidate backbones for a dataset from their frozen features, without fine-tuning:
LogME (You et al., ICML 2021), LEEP (Nguyen et al., ICML 2020; from the ImageNet head of a
pretrained EfficientNet-Lite, null otherwise) and a 5-fold ridge probe's accuracy. Higher is better
for each; compare candidates on the same data only.

--data is an image folder (one subfolder per class), a .csv with text,label columns (or .jsonl),
or a dataset name (fashion-mnist, mnist-subset, digits, rotten-tomatoes).

A candidate is a backbone name (efficientnet-lite0/1/2, minilm-l6) followed by any of:
  @SIZE     image input size in pixels (default: the backbone's own, 224/240/260)
  :LAYERS   text only: keep the first LAYERS encoder layers (minilm-l6:3)
  +random   the same architecture with random weights (the baseline pretraining must beat)
e.g. efficientnet-lite1@224, efficientnet-lite0+random@112, minilm-l6:3, minilm-l6+random."""


@dataclass(frozen=True)
class Candidate:
    """One backbone to score, as ``--candidates`` names it."""

    spec: str  # as given: the key of the table and the JSON
    backbone: str
    pretrained: bool = True
    image_size: int | None = None
    num_layers: int | None = None


def parse_candidate(spec: str) -> Candidate:
    """``NAME[@SIZE][:LAYERS][+random]`` (suffixes in any order) -> ``Candidate``.

    Raises:
        UnknownBackboneError: NAME is not a backbone.
        ConfigError: a malformed or repeated suffix, or one that does not fit the backbone.
    """
    from fineserve.training.backbones import backbone_config

    text = spec.strip()
    name, *suffixes = re.split(r"(?=[@:+])", text)
    kind = backbone_config(name).kind  # UnknownBackboneError lists the names
    values: dict[str, Any] = {}
    for suffix in suffixes:
        value: bool | int
        if suffix == RANDOM_SUFFIX:
            key, value = "pretrained", False
        elif re.fullmatch(r"@[1-9][0-9]*", suffix):
            key, value = "image_size", int(suffix[1:])
        elif re.fullmatch(r":[1-9][0-9]*", suffix):
            key, value = "num_layers", int(suffix[1:])
        else:
            raise ConfigError(f"candidate {spec!r}: cannot read {suffix!r} (use @SIZE, :LAYERS or +random)")
        if key in values:
            raise ConfigError(f"candidate {spec!r}: {suffix[0]}... given twice")
        values[key] = value
    if kind == "text" and "image_size" in values:
        raise ConfigError(f"candidate {spec!r}: @SIZE is for image backbones; {name} reads text")
    if kind == "image" and "num_layers" in values:
        raise ConfigError(f"candidate {spec!r}: :LAYERS is for text backbones; {name} reads images")
    if values.get("num_layers", 0) > ENCODER_LAYERS.get(name, 0):
        raise ConfigError(f"candidate {spec!r}: {name} has {ENCODER_LAYERS.get(name)} encoder layers")
    if "image_size" in values and not 32 <= values["image_size"] <= 1024:
        raise ConfigError(f"candidate {spec!r}: image size must be 32..1024 pixels")
    return Candidate(text, name, **values)


def parse_candidates(text: str) -> list[Candidate]:
    candidates = [parse_candidate(part) for part in text.split(",") if part.strip()]
    if not candidates:
        raise ConfigError("--candidates: give at least one backbone, e.g. efficientnet-lite0,minilm-l6")
    specs = [c.spec for c in candidates]
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        raise ConfigError(f"--candidates: {', '.join(repeated)} given more than once")
    return candidates


@dataclass(frozen=True)
class RankData:
    """The examples every candidate is scored on: a seeded subset, labels 0..K-1 over the classes
    it holds."""

    kind: str  # "image" or "text"
    names: list[str]
    labels: np.ndarray
    raw: Any  # datasets.RawData of exactly these examples, labels renumbered
    source: str


def load_rank_data(source: str, *, samples: int, seed: int) -> RankData:
    """``source`` (a folder, a text file or a dataset name) -> at most ``samples`` examples.

    Raises:
        DatasetError: missing or unreadable data.
        ScoringError: one class, or fewer examples than classes.
    """
    import torch

    from fineserve.training.datasets import RawData, default_cache_dir, image_folder, load_dataset, text_file

    path = Path(source)
    if path.is_dir():
        raw = image_folder(path)
    elif path.is_file():
        raw = text_file(path, "text", "label")
    elif source in NAMED_DATASETS:
        raw = load_dataset(source, data_path=None, cache=default_cache_dir(), text_column="", label_column="")
    else:
        raise DatasetError(
            f"--data {source!r} is not a folder, a .csv/.jsonl file or one of {', '.join(NAMED_DATASETS)}"
        )
    order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(seed))[:samples]
    if len(order) < len(raw.names):
        raise ScoringError(f"fewer examples ({len(order)}) than classes ({len(raw.names)}) in {source}")
    present = sorted(set(raw.labels[order].tolist()))
    if len(present) < 2:
        raise ScoringError(f"the data hold {len(present)} class ({source}); ranking needs at least 2")
    renumber = torch.full((len(raw.names),), -1, dtype=torch.int64)
    renumber[present] = torch.arange(len(present))
    labels = renumber[raw.labels[order]]
    subset = RawData(
        [raw.names[k] for k in present],
        labels,
        images=raw.images[order] if raw.images is not None else None,
        texts=[raw.texts[int(i)] for i in order] if raw.texts is not None else None,
        source=raw.source,
    )
    kind = "image" if raw.images is not None else "text"
    return RankData(kind, subset.names, labels.numpy(), subset, raw.source)


@dataclass(frozen=True)
class Outputs:
    """A candidate's frozen features ([N, D]) and, with a pretrained source head, its predicted
    distribution over the source classes ([N, Z])."""

    features: np.ndarray
    source_probs: np.ndarray | None


def candidate_outputs(
    candidate: Candidate,
    data: RankData,
    *,
    device: Any,
    batch_size: int,
    max_length: int | None,
    seed: int,
    show: bool,
) -> Outputs:
    """Builds the candidate and runs every example through it once."""
    import torch
    from torch.nn import functional

    from fineserve.training import layers
    from fineserve.training.backbones import backbone_config, create_model, tokenizer_file
    from fineserve.training.data import ImagePipeline, PrepareBatch, image_encoder, text_encoder
    from fineserve.training.features import frozen_features
    from fineserve.training.loop import Step

    backbone = backbone_config(candidate.backbone)
    torch.manual_seed(seed)  # a random-init candidate gets the same weights on every run
    size = candidate.image_size or backbone.image_size
    index = torch.arange(len(data.labels))
    # The EfficientNet package prints "Loaded pretrained weights ..." to stdout, into the table.
    with contextlib.redirect_stdout(sys.stderr):
        if backbone.kind == "image":
            # 1000 classes keeps the ImageNet head, whose predictions LEEP reads.
            model = create_model(candidate.backbone, 1000, pretrained=candidate.pretrained, image_size=size)
        else:
            model = create_model(
                candidate.backbone, 2, pretrained=candidate.pretrained, num_layers=candidate.num_layers
            )
    if backbone.kind == "image":
        examples = image_encoder(data.raw, index)
    else:
        encode = text_encoder(tokenizer_file(candidate.backbone), max_length or backbone.max_length)
        examples = encode(data.raw, index)
    model.to(device)
    # The loss is never called: features only prepare batches and run the model forward.
    step = Step(
        PrepareBatch(device, ImagePipeline(size, backbone.mean, backbone.std)),
        lambda logits, batch: functional.cross_entropy(logits, batch["labels"]),
        device,
    )
    features = frozen_features(
        model, examples, step, batch_size, show=show, desc=f"features {candidate.spec}"
    )
    source_probs = None
    if backbone.kind == "image" and candidate.pretrained:
        with torch.no_grad():  # in eval mode the head's dropout is off: these are the model's logits
            logits = layers.head(model)(features.to(device)).double().cpu()
        source_probs = functional.softmax(logits, dim=1).numpy()
    return Outputs(features.double().numpy(), source_probs)


def scores(outputs: Outputs, labels: np.ndarray) -> dict[str, float | None]:
    """LogME, LEEP (None without source predictions) and probe accuracy of one candidate."""
    from fineserve.training.transferability import leep, logme, probe_accuracy

    return {
        "logme": logme(outputs.features, labels),
        "leep": None if outputs.source_probs is None else leep(outputs.source_probs, labels),
        "probe_accuracy": probe_accuracy(outputs.features, labels),
    }


def table_row(name: str, result: dict[str, Any], width: int) -> str:
    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return (
        f"{name:<{width}}  {number(result['logme'], 4):>8}  {number(result['leep'], 4):>8}  "
        f"{number(result['probe_accuracy'], 4):>9}  {result['seconds']:>8.1f}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve train rank",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="image folder, .csv/.jsonl text file, or dataset name")
    parser.add_argument("--candidates", required=True, help="comma-separated candidates (see above)")
    parser.add_argument(
        "--json", type=Path, help="write {candidate: {logme, leep, probe_accuracy, seconds, examples}}"
    )
    parser.add_argument("--samples", type=int, default=2000, help="score a seeded subset this large [2000]")
    parser.add_argument("--seed", type=int, default=0, help="subset, folds and random weights [0]")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass [64]")
    parser.add_argument("--max-length", type=int, help="text: tokens per example [the backbone's, 128]")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[auto]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default) [0]")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars [on]"
    )
    return parser


def rank(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Scores every candidate; prints the table as it fills; writes ``--json`` after each row."""
    from fineserve.training.backbones import backbone_config

    if args.samples < 2 or args.batch_size < 1 or (args.max_length is not None and args.max_length < 2):
        raise ConfigError("--samples and --max-length must be at least 2, --batch-size at least 1")
    candidates = parse_candidates(args.candidates)  # a bad name fails before any data is read
    data = load_rank_data(args.data, samples=args.samples, seed=args.seed)
    for candidate in candidates:
        kind = backbone_config(candidate.backbone).kind
        if kind != data.kind:
            raise ConfigError(f"candidate {candidate.spec!r} reads {kind}s; {args.data} holds {data.kind}s")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"data: {data.source}: {len(data.labels)} {data.kind}s, {len(data.names)} classes; device {device}")
    width = max(len("candidate"), *(len(c.spec) for c in candidates))
    print(f"{'candidate':<{width}}  {'LogME':>8}  {'LEEP':>8}  {'probe acc':>9}  {'seconds':>8}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for candidate in candidates:
        started = time.perf_counter()
        outputs = candidate_outputs(
            candidate,
            data,
            device=device,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            show=args.progress,
        )
        result: dict[str, Any] = scores(outputs, data.labels)
        result["seconds"] = round(time.perf_counter() - started, 2)
        result["examples"] = len(data.labels)  # what the scores came from (at most --samples)
        results[candidate.spec] = result
        print(table_row(candidate.spec, result, width), flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rank(args)
    except TrainingError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
