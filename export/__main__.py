"""``fineserve export`` (``python -m fineserve.export``): checkpoints, ONNX files -> checked versions.

Thin on purpose: it parses arguments and calls ``export.pipeline`` / ``export.wrap`` /
``export.defaults``. An expected failure (``export.errors``) ends in one line, ``error: ...``, and
exit status 1 (2 for bad usage, from argparse). Heavy imports (torch) happen only in the
subcommand that needs them, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fineserve.export.contract import (
    CROP_FRACTION_RANGE,
    INTERPOLATIONS,
    MAX_LENGTH_RANGE,
    MEAN_RANGE,
    PRECISIONS,
    STD_RANGE,
    ImagePreprocessing,
    TextPreprocessing,
    check_labels,
    finite_in,
)
from fineserve.export.errors import ExportError, UsageError, ValidationError
from fineserve.training.errors import TrainingError, UnknownBackboneError

EXIT_FAILED = 1
# Upper bounds that keep a typo from exhausting memory: every checked batch size runs through each
# variant, and every example is held in memory in each of the model's input forms (docs/export.md).
MAX_BATCH_SIZE = 1024
MAX_EXAMPLES = 10_000


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        return _failed("interrupted; nothing was published")
    except ValidationError as err:
        return _failed(f"check failed ({type(err).__name__}): {err}; nothing was published")
    except UnknownBackboneError as err:
        return _failed(f"unsupported model: {err}")
    except (ExportError, TrainingError) as err:  # anything else is a bug: it keeps its traceback
        return _failed(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return 0


def _failed(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve export",
        description="Export, check and publish classifiers into a versioned model repository.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ckpt = commands.add_parser(
        "checkpoint",
        help="a training run folder -> a checked, published version",
        description="Exports a training run folder (best.pt + metadata.json) to ONNX, checks every variant "
        "against PyTorch on held-out examples, and publishes the next version.",
    )
    ckpt.add_argument(
        "run_dir", type=Path, help="training run folder (best.pt, metadata.json[, tokenizer.json])"
    )
    _add_repository(ckpt)
    ckpt.add_argument("--name", required=True, help="model name in the repository ([a-z0-9][a-z0-9_-]*)")
    _add_export_options(ckpt, default_variants="fp32,fp16,int8")
    ckpt.add_argument(
        "--examples",
        type=Path,
        help="held-out examples: a folder <label>/<image> (image models) or a label<TAB>text file "
        "(text models); default: rebuild the run's recorded test split",
    )
    ckpt.add_argument(
        "--max-examples",
        type=int,
        default=1000,
        help=f"check on at most this many examples (1..{MAX_EXAMPLES})",
    )
    ckpt.add_argument(
        "--exporter", choices=("torchscript", "dynamo"), default="torchscript", help="ONNX exporter"
    )
    ckpt.add_argument(
        "--opset", type=int, default=18, help="ONNX opset (default 18; torchscript 13..20, dynamo 18..23)"
    )
    ckpt.set_defaults(run=_run_checkpoint)

    wrap = commands.add_parser(
        "wrap",
        help="bring your own ONNX classifier -> a checked, published version",
        description="Wraps an ONNX image or text classifier made elsewhere (tf2onnx, skl2onnx, ...) with its "
        "labels and preprocessing into a repository version. Tensors are renamed to pixel_values / "
        "input_ids, attention_mask / logits. Given --examples and --reference-logits (the original "
        "framework's logits for those examples, in order), the graph passes the same value checks as "
        "our own exports.",
    )
    wrap.add_argument("onnx_file", type=Path, help="the ONNX classifier")
    _add_repository(wrap)
    wrap.add_argument("--name", required=True, help="model name in the repository ([a-z0-9][a-z0-9_-]*)")
    wrap.add_argument(
        "--task", required=True, help="image-classification or text-classification (others are refused)"
    )
    wrap.add_argument(
        "--labels", required=True, help="a file with one label per line, or comma-separated labels"
    )
    wrap.add_argument(
        "--output", help="name of the logits output in the graph (default: the first [N, K] float one)"
    )
    wrap.add_argument("--image-size", help="image models: HEIGHTxWIDTH or one number for a square")
    wrap.add_argument(
        "--mean",
        default="0.485,0.456,0.406",
        help=f"image models: per-channel mean on [0, 1] pixels, each in [{MEAN_RANGE[0]}, {MEAN_RANGE[1]}]",
    )
    wrap.add_argument(
        "--std",
        default="0.229,0.224,0.225",
        help=f"image models: per-channel std on [0, 1] pixels, each in [{STD_RANGE[0]}, {STD_RANGE[1]}]",
    )
    wrap.add_argument(
        "--crop-fraction",
        type=float,
        default=1.0,
        help=f"image models: centre-crop fraction [{CROP_FRACTION_RANGE[0]}, {CROP_FRACTION_RANGE[1]}]",
    )
    wrap.add_argument(
        "--interpolation", choices=INTERPOLATIONS, default="bilinear", help="image models: resize"
    )
    wrap.add_argument(
        "--channel-order", choices=("RGB", "BGR"), default="RGB", help="image models: channel order"
    )
    wrap.add_argument("--tokenizer", type=Path, help="text models: the tokenizers JSON (tokenizer.json)")
    wrap.add_argument(
        "--max-length",
        type=int,
        default=128,
        help=f"text models: truncate to this many tokens ({MAX_LENGTH_RANGE[0]}..{MAX_LENGTH_RANGE[1]})",
    )
    wrap.add_argument("--examples", type=Path, help="held-out examples (as for `checkpoint --examples`)")
    wrap.add_argument("--reference-logits", type=Path, help=".npy [examples, classes]: the original's logits")
    wrap.add_argument(
        "--tolerance", type=float, default=1e-4, help="fp32 max |logit difference| to the reference"
    )
    _add_export_options(wrap, default_variants="fp32")
    wrap.set_defaults(run=_run_wrap)

    defaults = commands.add_parser(
        "defaults",
        help="build the default models that are missing (make models)",
        description="Trains (quick recipes), exports, checks and publishes the default models that have no "
        "version in the repository yet: fashion, digits, sentiment, imagenet.",
    )
    _add_repository(defaults)
    defaults.add_argument(
        "--only", action="append", metavar="NAME", help="build only this default model (repeatable)"
    )
    defaults.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where training run folders go")
    defaults.add_argument(
        "--max-examples",
        type=int,
        default=1000,
        help=f"check on at most this many examples (1..{MAX_EXAMPLES})",
    )
    defaults.add_argument(
        "--parallel-training",
        type=int,
        metavar="N",
        help="train this many missing models side by side (default: one per core; each quick recipe "
        "uses one thread)",
    )
    _add_max_batch_size(defaults)
    defaults.set_defaults(run=_run_defaults)
    return parser


def _add_repository(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository", type=Path, required=True, help="model repository folder (created if needed)"
    )


def _add_export_options(parser: argparse.ArgumentParser, default_variants: str) -> None:
    parser.add_argument(
        "--variants",
        default=default_variants,
        help=f"comma-separated precisions to build and check, from {','.join(PRECISIONS)} "
        f"(default {default_variants})",
    )
    _add_max_batch_size(parser)


def _add_max_batch_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help=f"largest batch checked and served (1..{MAX_BATCH_SIZE})",
    )


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from fineserve.export.pipeline import ExportSettings

    chosen = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in chosen if v not in PRECISIONS]
    if bad or "fp32" not in chosen:
        raise UsageError(f"--variants {args.variants!r}: choose from {', '.join(PRECISIONS)}, fp32 included")
    return ExportSettings(variants=chosen, max_batch_size=args.max_batch_size, **extra)


def _check_common(args: argparse.Namespace) -> None:
    """Options every subcommand shares, checked before any export or training work starts."""
    _check_folder(args.repository, "--repository")
    _check_range(args.max_batch_size, "--max-batch-size", 1, MAX_BATCH_SIZE)
    if getattr(args, "max_examples", None) is not None:
        _check_range(args.max_examples, "--max-examples", 1, MAX_EXAMPLES)


def _check_range(value: int, option: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UsageError(f"{option} {value}: must be in {low}..{high}")


def _check_folder(path: Path, option: str) -> None:
    """A folder that exists or can be created: no file where it or a parent should be."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"{option} {path}: {blocking} is a file, not a folder")


def _run_checkpoint(args: argparse.Namespace) -> None:
    from fineserve.export.onnx import check_exporter
    from fineserve.export.pipeline import export_and_publish, model_from_checkpoint

    _check_common(args)
    check_exporter(args.exporter, args.opset)
    settings = _settings(args, exporter=args.exporter, opset=args.opset)
    item = model_from_checkpoint(args.run_dir)
    calibration = None
    if args.examples is not None:
        from fineserve.export.examples import read_examples

        examples = read_examples(
            args.examples,
            item.task,
            item.labels,
            image=item.image,
            text=item.text,
            tokenizer_path=item.tokenizer_path,
            limit=args.max_examples,
        )
    else:
        from fineserve.export.heldout import examples_from_run
        from fineserve.training.checkpoint import read_metadata

        examples, calibration = examples_from_run(
            read_metadata(args.run_dir), args.run_dir, limit=args.max_examples
        )
    export_and_publish(item, examples, args.repository, args.name, settings=settings, calibration=calibration)


def _run_wrap(args: argparse.Namespace) -> None:
    import numpy as np

    from fineserve.export.examples import load_tokenizer, read_examples
    from fineserve.export.wrap import wrap_onnx

    _check_common(args)
    settings = _settings(args)
    labels = _labels(args.labels)
    image = text = None
    if args.task == "image-classification":
        if not args.image_size:
            raise UsageError("image models need --image-size")
        height, width = _size(args.image_size)
        image = ImagePreprocessing(
            height=height,
            width=width,
            mean=_triple(args.mean, "--mean", MEAN_RANGE),
            std=_triple(args.std, "--std", STD_RANGE),
            crop_fraction=finite_in(args.crop_fraction, "--crop-fraction", *CROP_FRACTION_RANGE),
            interpolation=args.interpolation,
            channel_order=args.channel_order,
        )
    elif args.task == "text-classification":
        _check_range(args.max_length, "--max-length", *MAX_LENGTH_RANGE)
        if args.tokenizer is None:
            raise UsageError("text models need --tokenizer (their tokenizer.json)")
        load_tokenizer(args.tokenizer)  # before any work: the server must be able to load it
        text = TextPreprocessing(max_length=args.max_length)
    examples = None
    if args.examples is not None:
        examples = read_examples(
            args.examples, args.task, labels, image=image, text=text, tokenizer_path=args.tokenizer
        )
    reference = None
    if args.reference_logits is not None:
        try:
            reference = np.load(args.reference_logits).astype(np.float32)
        except (OSError, ValueError) as err:
            raise UsageError(
                f"--reference-logits {args.reference_logits}: not a readable .npy ({err})"
            ) from None
    wrap_onnx(
        args.onnx_file,
        args.repository,
        args.name,
        task=args.task,
        labels=labels,
        image=image,
        text=text,
        tokenizer_path=args.tokenizer,
        examples=examples,
        reference=reference,
        output=args.output,
        settings=settings,
        tolerance=args.tolerance,
    )


def _run_defaults(args: argparse.Namespace) -> None:
    from fineserve.export.defaults import build_defaults
    from fineserve.export.pipeline import ExportSettings

    _check_common(args)
    _check_folder(args.runs_dir, "--runs-dir")
    if args.parallel_training is not None and args.parallel_training < 1:
        raise UsageError(f"--parallel-training: must be at least 1, got {args.parallel_training}")
    results = build_defaults(
        args.repository,
        only=args.only,
        runs_dir=args.runs_dir,
        settings=ExportSettings(max_batch_size=args.max_batch_size),
        max_examples=args.max_examples,
        parallel=args.parallel_training,
    )
    for result in results:
        if result.published is None:
            print(f"{result.name}: present")
        else:
            train = f"trained in {result.train_seconds:.0f} s, " if result.train_seconds else ""
            version, seconds = result.published.spec.version, result.published.seconds
            rejected = result.published.spec.source.get("rejected_variants") or {}
            left_out = f"; left out after a failed check: {', '.join(rejected)}" if rejected else ""
            print(
                f"{result.name}: version {version} ({train}exported and checked in {seconds:.0f} s){left_out}"
            )


def _labels(value: str) -> tuple[str, ...]:
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--labels {value}: not UTF-8 text (one label per line)") from None
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        labels = [v.strip() for v in value.split(",") if v.strip()]
    if len(labels) < 2:
        raise UsageError(f"--labels {value!r}: need at least 2 labels (a file, one per line, or a,b,c)")
    return check_labels(labels, "--labels")


def _size(value: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in value.lower().split("x")]
    except ValueError:
        raise UsageError(f"--image-size {value!r}: expected N or HEIGHTxWIDTH") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise UsageError(f"--image-size {value!r}: expected N or HEIGHTxWIDTH")
    return parts[0], parts[1]


def _triple(value: str, option: str, bounds: tuple[float, float]) -> tuple[float, float, float]:
    try:
        a, b, c = (float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{option} {value!r}: expected three comma-separated numbers") from None
    return (finite_in(a, option, *bounds), finite_in(b, option, *bounds), finite_in(c, option, *bounds))


if __name__ == "__main__":
    sys.exit(main())
