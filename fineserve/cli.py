"""``fineserve``: one command for the whole pipeline, as ``mlserver`` or ``optimum-cli`` have.

    fineserve train fashion --output-dir runs/fashion
    fineserve tune fashion --trials 20 --study fashion-1
    fineserve export checkpoint runs/fashion --repository models --name fashion
    fineserve serve --model-repository models
    fineserve predict --model sentiment "a warm film"
    fineserve bench suite --model-repository models

Each command is the program of its part, imported only when it runs (``fineserve predict`` never
loads torch or onnxruntime); ``fineserve-train`` and the other older names stay as aliases.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence

from fineserve import __version__

# name -> (module whose main(argv) runs it, one line of help)
COMMANDS = {
    "train": ("fineserve.training.__main__", "fine-tune a pretrained backbone from a YAML recipe"),
    "tune": ("fineserve.training.tuning.__main__", "search a recipe's hyperparameters (Optuna study)"),
    "export": ("fineserve.export.__main__", "checkpoints -> validated ONNX versions in a model repository"),
    "serve": ("fineserve.server.__main__", "serve a model repository over gRPC (KServe v2 and fineserve.v1)"),
    "predict": ("fineserve.predict", "call a running server: top-k labels for images, sentiment for texts"),
    "bench": ("fineserve.bench.__main__", "benchmarks that print their figures and write JSON"),
}


# The extra that installs what each command needs (pyproject.toml).
EXTRAS = {
    "train": "train",
    "tune": "train",
    "export": "train",
    "serve": "serve",
    "predict": "client",
    "bench": "serve,train",
}


def listing(commands: Mapping[str, tuple[str, str]]) -> list[str]:
    """The lines of a usage text that list ``commands`` (name -> (module, one line of help))."""
    return ["commands:", *(f"  {name:<8} {help_}" for name, (_, help_) in commands.items())]


def chosen(
    args: Sequence[str], commands: Mapping[str, tuple[str, str]], usage: str, unknown: str
) -> tuple[str, list[str]] | int:
    """The command ``args`` name and the arguments for it, or an exit code: 0 after printing
    ``usage`` (no arguments, -h, --help), 2 after printing ``unknown`` (``{name}``, ``{names}``)
    for a name not in ``commands``. ``fineserve`` and ``fineserve bench`` dispatch with it."""
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return 0
    if args[0] not in commands:
        print(unknown.format(name=repr(args[0]), names=", ".join(commands)), file=sys.stderr)
        return 2
    return args[0], list(args[1:])


def usage() -> str:
    lines = [f"usage: fineserve {{{','.join(COMMANDS)}}} [options]", "", __doc__.strip().splitlines()[0], ""]
    lines += [
        *listing(COMMANDS),
        "",
        "Run `fineserve COMMAND --help` for a command's options; `fineserve --version`.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        print(f"fineserve {__version__}")
        return 0
    picked = chosen(args, COMMANDS, usage(), "fineserve: unknown command {name}; choose one of: {names}")
    if isinstance(picked, int):
        return picked
    name, rest = picked
    try:
        module = importlib.import_module(COMMANDS[name][0])
        result: int = module.main(rest)
    except ModuleNotFoundError as err:  # the command's extra is not installed
        if (err.name or "fineserve").startswith("fineserve"):
            raise
        print(
            f"fineserve {name}: needs the {err.name!r} package, which the {EXTRAS[name]!r} extra installs "
            f"(from a checkout: pip install '.[{EXTRAS[name]}]')",
            file=sys.stderr,
        )
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
