"""Where a study lives: an SQLAlchemy URL opened as Optuna's ``RDBStorage``.

SQLite (a file beside the study's results) serves workers on one machine; workers on several
machines share a PostgreSQL database (``postgresql+psycopg://user:password@host:5432/db``). The
storage is opened once, up front, so a URL that cannot work fails in one line before any
training starts, and never prints its password.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from fineserve.training.errors import TrainingError

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

# A worker that dies mid-trial stops beating; after the grace period the next worker to start a
# trial marks the dead one failed, so it no longer counts as running.
HEARTBEAT_S = 60
GRACE_S = 180
# A database host that drops packets would otherwise hold the command for the OS's TCP timeout.
CONNECT_TIMEOUT_S = 10
CREATE_ATTEMPTS = 3


class StorageError(TrainingError):
    """The study's storage URL cannot be parsed, has no driver, or its database cannot be reached."""


def default_storage(output_dir: Path) -> str:
    """SQLite in the study's output folder (created)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(output_dir / 'study.db').resolve()}"


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def open_storage(url: str) -> RDBStorage:
    """The storage at ``url``, connected and with Optuna's tables in place.

    Raises:
        StorageError: one line naming the URL (password hidden) and what went wrong.
    """
    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage

    shown = redact(url)
    if "://" not in url:
        raise StorageError(
            f"--storage {shown}: not a database URL (sqlite:///FILE or postgresql+psycopg://...)"
        )
    engine_kwargs = {}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        for attempt in range(CREATE_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
                    return RDBStorage(
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
                    )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Workers started together on a new database race to create Optuna's tables
                # (PostgreSQL: a duplicate pg_type row); the loser finds them made on a retry.
                if attempt + 1 == CREATE_ATTEMPTS:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
    except ImportError as err:
        raise StorageError(
            f"--storage {shown}: no database driver for it ({_first_line(err)}); "
            "fineserve installs psycopg for PostgreSQL: postgresql+psycopg://"
        ) from None
    except sqlalchemy.exc.ArgumentError as err:
        raise StorageError(f"--storage {shown}: not a usable database URL ({_first_line(err)})") from None
    except sqlalchemy.exc.OperationalError as err:
        cause = _first_line(err.orig) if err.orig is not None else _first_line(err)
        raise StorageError(f"--storage {shown}: cannot reach the database ({redact(cause)})") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StorageError(f"--storage {shown}: {redact(_first_line(err))}") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__
