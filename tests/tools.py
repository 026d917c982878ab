"""External programs the tests run (Prometheus, promtool): found, or the test says what to install.

``make test`` installs them first (tests/observability/install_prometheus.sh), and its skip gate
(tests/skip_gate.py) turns a skip for a missing program into a failed run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PROMETHEUS_HINT = (
    "Debian package 'prometheus' is not installed and could not be (make test installs it as root "
    "through tests/observability/install_prometheus.sh)"
)


def binary(name: str, hint: str = PROMETHEUS_HINT) -> str:
    """The path of program ``name``; skips the test, saying why, when it is missing."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/local/bin") / name) if p.exists()), None
    )
    if found is None:
        pytest.skip(f"{name} not found: {hint}")
    return found
