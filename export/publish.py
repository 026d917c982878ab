"""Atomic publishing into the model repository.

A version is built in ``<repository>/<model>/.tmp-<uuid>/`` (same file system, a name readers
ignore) and renamed to the next integer version only when complete: a server polling the folder
sees either no version or the whole one. Any failure while building removes the temporary folder,
so a failed check leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fineserve.export.contract import MODEL_NAME, ModelSpec, list_versions, write_model_spec
from fineserve.export.errors import PublishError

TMP_PREFIX = ".tmp-"
_RENAME_ATTEMPTS = 20


@contextmanager
def staging_folder(repository: Path, name: str) -> Iterator[Path]:
    """A fresh temporary folder for one version of ``name``; removed if the block raises.

    On success the caller has normally renamed it away with ``publish``; if not, it is removed too.
    """
    if not MODEL_NAME.match(name):
        raise PublishError(f"model name {name!r} must match {MODEL_NAME.pattern}")
    model_dir = repository / name
    staging = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:  # a file where a folder should be, permissions, a full disk
        raise PublishError(f"cannot create {staging} in repository {repository}: {err.strerror}") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, spec: ModelSpec) -> Path:
    """Writes ``model.json`` into ``staging`` and renames it to the next free version.

    The spec's version is replaced by the one actually taken. Returns the version folder.

    Raises:
        PublishError: a file the spec names is missing, or no version could be taken.
    """
    needed = [v.file for v in spec.variants.values()]
    if spec.text is not None:
        needed.append(spec.text.tokenizer_file)
    missing = [f for f in needed if not (staging / f).is_file()]
    if missing:
        raise PublishError(f"cannot publish {spec.name}: missing {', '.join(missing)}")
    model_dir = staging.parent
    for _ in range(_RENAME_ATTEMPTS):
        version = max(list_versions(model_dir), default=0) + 1
        final = model_dir / str(version)
        write_model_spec(staging, dataclasses.replace(spec, version=version))
        if final.exists():  # another publisher took it between listing and here
            continue
        try:
            os.rename(staging, final)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise PublishError(f"cannot publish {final}: {err}") from None
        return final
    raise PublishError(f"cannot publish {spec.name}: no free version after {_RENAME_ATTEMPTS} attempts")
