"""``fineserve train`` / ``python -m fineserve.training``: a YAML recipe, overrides, one run folder.

Thin on purpose: argument parsing and error reporting here, the work in ``training.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

from fineserve.training.config import (
    FIELD_HELP,
    TrainConfig,
    build_config,
    load_recipe,
    parse_override,
    recipe_path,
)
from fineserve.training.errors import TrainingError

DESCRIPTION = """Fine-tune a pretrained backbone on a dataset and write a run folder:
best.pt + metadata.json (+ tokenizer.json for text), last.pt (resume state), metrics.jsonl,
args.yaml, learning_curves.png, confusion_matrix.png.

Values come from the recipe (a name in training/configs/ such as fashion, digits, sentiment,
or a path to a .yaml file), then from --KEY VALUE options, then from --set KEY=VALUE (values are
YAML: 1e-3, true, null, [a, b]). Rerunning the same command after an interruption resumes from
OUTPUT_DIR/last.pt. Under torchrun the same command trains data-parallel.

`fineserve train rank --data PATH --candidates A,B,...` scores backbones for a dataset from frozen
features instead (LogME, LEEP, probe accuracy); `fineserve train rank --help` for its options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe name (training/configs/NAME.yaml) or path to a YAML recipe")
    parser.add_argument("--output-dir", required=True, type=Path, help="the run folder to write (created)")
    add_override_arguments(parser)
    return parser


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` and one ``--KEY VALUE`` option per recipe key (``fineserve tune`` takes
    the same overrides as ``fineserve train``)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe key (repeatable)",
    )
    options = parser.add_argument_group("recipe keys (each overrides the recipe; default in brackets)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        options.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"key_{f.name}",
            metavar="VALUE",
            default=None,
            help=f"{FIELD_HELP.get(f.name, '')} [{getattr(defaults, f.name)}]".replace("%", "%%"),
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return build_config(recipe_values(args))


def recipe_values(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's keys with the command line's overrides applied, not yet checked."""
    values: dict[str, Any] = load_recipe(recipe_path(args.recipe))
    for f in dataclasses.fields(TrainConfig):
        raw = getattr(args, f"key_{f.name}")
        if raw is not None:
            values[f.name] = parse_override(f"{f.name}={raw}")[1]
    for text in args.overrides:
        key, value = parse_override(text)
        values[key] = value
    return values


class Terminated(KeyboardInterrupt):
    """SIGTERM (a container or job scheduler stopping the run): handled like Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank"]:  # a subcommand, not a recipe: no recipe is called rank
        from fineserve.training import rank

        return rank.main(argv[1:])
    args = build_parser().parse_args(argv)
    # Without this, SIGTERM ends the process on the spot: no message, and no word on how to resume.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cfg = config_from_args(args)
        from fineserve.training.run import (
            train,  # heavy imports (torch, transformers) after the config is valid
        )

        result = train(cfg, args.output_dir)
    except (TrainingError, FloatingPointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Terminated:
        return _stopped("stopped (SIGTERM)", args.output_dir, 143)
    except KeyboardInterrupt:
        return _stopped("interrupted", args.output_dir, 130)
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
    if result.stopped:  # stop_after_steps: stopped as if interrupted
        return _stopped("interrupted", args.output_dir, 130)
    return 0


def _stopped(why: str, output_dir: Path, status: int) -> int:
    print(f"error: {why}; rerun the same command to resume from {output_dir}/last.pt", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
