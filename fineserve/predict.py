"""``fineserve predict``: call a running server from a shell.

    fineserve predict --model imagenet cat.jpg dog.png      top-k labels of each image, as a table
    fineserve predict --model sentiment "a warm film" -     label and score of each text (- : stdin lines)
    fineserve predict --model sentiment --json "a dull film"   the same as JSON, for scripts

The model's task (from ``ListModels``) decides whether the inputs are image files or texts.
Failures are one line on stderr: exit 2 for bad arguments or unreadable files, 1 for a call the
server refused (with its gRPC status).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from fineserve.client import Credentials, LabelScore, ModelInfo, Sentiment, SyncFineserveClient

DEFAULT_URL = "localhost:8001"
IMAGE_TASK = "image-classification"
TEXT_TASK = "text-classification"


class UsageError(Exception):
    """Bad arguments or unreadable inputs: one line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve predict",
        description=__doc__.splitlines()[0],
        epilog="Inputs are image files for an image model and texts for a text model; '-' reads "
        "an image's bytes or one text per line from stdin.",
    )
    parser.add_argument("inputs", nargs="+", help="image files, or texts")
    parser.add_argument("--model", required=True, help="model name (ListModels shows them)")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the served one)")
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"server address host:port (default {DEFAULT_URL})"
    )
    parser.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    tls = parser.add_argument_group("TLS and tokens (docs/reliability.md)")
    tls.add_argument("--ca-file", type=Path, help="PEM CA bundle to trust (turns TLS on)")
    tls.add_argument("--cert-file", type=Path, help="client certificate for mutual TLS")
    tls.add_argument("--key-file", type=Path, help="the client certificate's private key")
    tls.add_argument("--tls", action="store_true", help="TLS with the system's CA roots")
    tls.add_argument("--token-file", type=Path, help="file holding the bearer token")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top_k < 1:
            raise UsageError("--top-k must be at least 1")
        if args.version is not None and args.version < 1:
            raise UsageError("--version must be at least 1")
        credentials = _credentials(args)
        with SyncFineserveClient(args.url, timeout=args.timeout, credentials=credentials) as client:
            model = _find_model(client.list_models(), args.model)
            if model.task == IMAGE_TASK:
                images = [_read_image(name) for name in args.inputs]
                labels = client.classify(args.model, images, top_k=args.top_k, version=args.version)
                print(_image_json(args.inputs, labels) if args.json else _image_table(args.inputs, labels))
            elif model.task == TEXT_TASK:
                texts = _texts(args.inputs)
                found = client.analyze_sentiment(args.model, texts, version=args.version)
                print(_text_json(texts, found) if args.json else _text_table(texts, found))
            else:
                raise UsageError(f"model {args.model!r} has task {model.task!r}, which predict cannot call")
    except UsageError as err:
        print(f"fineserve predict: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"fineserve predict: {_describe(err, args.url)}", file=sys.stderr)
        return 1
    return 0


def _credentials(args: argparse.Namespace) -> Credentials:
    try:
        return Credentials.from_files(
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            token_file=args.token_file,
            tls=True if args.tls else None,
        )
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(
            f"cannot read {getattr(err, 'filename', None) or 'a credentials file'}: {err}"
        ) from None
    except ValueError as err:
        raise UsageError(str(err)) from None


def _find_model(models: list[ModelInfo], name: str) -> ModelInfo:
    for model in models:
        if model.name == name:
            return model
    served = ", ".join(sorted(m.name for m in models)) or "none"
    raise UsageError(f"the server has no model {name!r} (models: {served})")


def _read_image(name: str) -> bytes:
    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(name).read_bytes()
        except OSError as err:
            raise UsageError(f"cannot read image {name!r}: {err.strerror or err}") from None
    if not data:
        raise UsageError(f"image {name!r} is empty")
    return data


def _texts(inputs: list[str]) -> list[str]:
    texts: list[str] = []
    for item in inputs:
        if item == "-":
            texts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
        else:
            texts.append(item)
    if not texts:
        raise UsageError("no text to classify (stdin was empty)")
    return texts


def _describe(err: grpc.RpcError, url: str) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"no server answering at {url} (UNAVAILABLE: {details})"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"


def _labels_json(labels: Sequence[LabelScore]) -> list[dict[str, Any]]:
    return [{"label": s.label, "score": s.score, "index": s.index} for s in labels]


def _image_json(names: list[str], results: list[tuple[LabelScore, ...]]) -> str:
    return json.dumps([{"input": n, "labels": _labels_json(r)} for n, r in zip(names, results, strict=True)])


def _text_json(texts: list[str], results: list[Sentiment]) -> str:
    rows = [
        {"input": t, "label": s.label, "score": s.score, "scores": _labels_json(s.scores)}
        for t, s in zip(texts, results, strict=True)
    ]
    return json.dumps(rows)


def _image_table(names: list[str], results: list[tuple[LabelScore, ...]]) -> str:
    lines: list[str] = []
    for name, labels in zip(names, results, strict=True):
        lines.append(name)
        width = max((len(s.label) for s in labels), default=5)
        lines += [f"  {rank:>2}  {s.label:<{width}}  {s.score:.4f}" for rank, s in enumerate(labels, 1)]
    return "\n".join(lines)


def _text_table(texts: list[str], results: list[Sentiment]) -> str:
    width = max(5, *(len(s.label) for s in results))
    lines = [f"{'label':<{width}}  score   text"]
    for text, found in zip(texts, results, strict=True):
        shown = text if len(text) <= 60 else text[:57] + "..."
        lines.append(f"{found.label:<{width}}  {found.score:.4f}  {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
