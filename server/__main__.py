"""``fineserve serve`` (= ``python -m fineserve.server``): read settings, run the server until SIGTERM.

Every setting has a flag (``--grpc-port 9001`` for ``grpc_port``); flags beat environment
variables (``FINESERVE_GRPC_PORT``), which beat the YAML file (``--config FILE``). Maps
(``specific_versions``) are set in the file or environment only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fineserve.server.config import Settings, SettingsError, load_settings, unknown_environment_variables


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve serve",
        description="Serve the model repository over gRPC (fineserve.v1 and KServe v2), with metrics.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--config" if name == "config_file" else "--" + name.replace("_", "-")
        kind = _flag_kind(field.annotation)
        if kind is None:
            continue
        # argparse formats help with %: a literal one (as in "15%") must be doubled.
        help_text = " ".join((field.description or "").split()).replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind is list:
            parser.add_argument(flag, dest=name, nargs="*", type=int, default=None, help=help_text)
        else:
            choices = _choices(field.annotation)
            metavar = None if choices else _metavar(name, field.annotation)
            parser.add_argument(
                flag, dest=name, default=None, choices=choices, metavar=metavar, help=help_text
            )
    # How the supervisor of --workers N starts each worker (server/supervisor.py); not for users.
    parser.add_argument("--worker-of", dest="worker_of", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", dest="worker_index", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def _flag_kind(annotation: Any) -> type | None:
    """bool, list, str-like, or None for settings that have no flag (maps)."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return bool
    if origin is list:
        return list
    if origin is dict:
        return None
    if origin in (typing.Union, types.UnionType):
        return str
    return str


def _metavar(name: str, annotation: Any) -> str:
    if name.endswith("_file"):
        return "FILE"
    kinds = set(typing.get_args(annotation)) | {annotation}
    if Path in kinds:
        return "DIR"
    if int in kinds:
        return "N"
    if float in kinds:
        return "X"
    return "TEXT"


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(x) for x in typing.get_args(annotation)]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    given = vars(args)
    worker_of, worker_index = given.pop("worker_of"), given.pop("worker_index")
    if worker_of is not None:
        from fineserve.server.pool import PoolDir
        from fineserve.server.threads import set_parent_death_signal

        # A worker outlives no supervisor: when it dies, SIGTERM drains the worker. One that died
        # before this line sends nothing, but then this process has another parent already.
        set_parent_death_signal(signal.SIGTERM)
        pool = PoolDir(worker_of)
        if os.getppid() != pool.supervisor_pid:
            print(f"fineserve serve: error: worker {worker_index}: its supervisor is gone", file=sys.stderr)
            return 1
        # Before any thread starts: every thread the worker makes inherits its share of the cores.
        pool.take_cpus(worker_index)
    try:
        settings = load_settings(**given)
    except SettingsError as err:
        for line in str(err).splitlines():
            print(f"fineserve serve: error: {line}", file=sys.stderr)
        return 2
    # Imported after the settings are valid: a bad flag answers fast, without loading grpc or onnxruntime.
    from fineserve.server.app import configure_logging, serve
    from fineserve.server.runtime import ProviderUnavailable

    configure_logging(settings, worker=worker_index if worker_of is not None else None)
    if worker_of is None:
        for name in unknown_environment_variables():
            logging.getLogger("fineserve.server").warning(
                "%s is not a fineserve serve setting; ignored", name
            )
    if worker_of is None and settings.workers != 1:
        from fineserve.server.supervisor import supervise, worker_count

        count, why = worker_count(settings)
        logging.getLogger("fineserve.server").info("workers: %d (%s)", count, why)
        if count > 1:
            return supervise(settings, argv, count)
    worker = None
    if worker_of is not None:
        from fineserve.server.worker import WorkerRole

        worker = WorkerRole(worker_of, worker_index)
    try:
        asyncio.run(serve(settings, worker))
    except (ProviderUnavailable, SettingsError) as err:  # settings only found wanting at startup
        print(f"fineserve serve: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"fineserve serve: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
