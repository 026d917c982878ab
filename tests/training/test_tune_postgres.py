"""Scaling out as Optuna does: two ``fineserve tune`` workers, one study, a real PostgreSQL.

The test starts its own server (initdb in a temporary folder, loopback only, stopped at the end
even when the test fails). PostgreSQL refuses to run as root: as root, the server runs as the
``postgres`` user the Debian package creates. ``make postgres`` installs the package when missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from fineserve.bench.server_process import free_port
from tests.training.tune_fixtures import tiny_tune_recipe

ROOT = Path(__file__).resolve().parents[2]
TRIALS_PER_WORKER = 3


def postgres_bin() -> Path:
    """The folder of initdb, pg_ctl and createdb: the one initdb on PATH links to, else Debian's
    /usr/lib/postgresql/VERSION/bin (the package puts only a wrapper or nothing on PATH)."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("PostgreSQL is not installed: run `make postgres` (Debian package postgresql)")
    return Path(found[-1]).parent


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh server on a free loopback port with an empty database ``tune``; its URL."""
    bin_dir = postgres_bin()
    # Not pytest's tmp_path: as root the server's user must reach the folder, and pytest's is 0700.
    root = Path(tempfile.mkdtemp(prefix="fineserve-pg-"))
    as_server_user: list[str] = []
    if os.getuid() == 0:
        user = pwd.getpwnam("postgres")  # created by the Debian package
        os.chown(root, user.pw_uid, user.pw_gid)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    data, sockets, port = root / "data", root, free_port()

    def run(*command: str | Path) -> None:
        subprocess.run([*as_server_user, *map(str, command)], check=True, capture_output=True, timeout=120)

    started = False
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "tuner", "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-k {sockets} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off"
        run(
            bin_dir / "pg_ctl",
            "-D",
            data,
            "-l",
            root / "server.log",
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        started = True
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tuner", "tune")
        yield f"postgresql+psycopg://tuner@127.0.0.1:{port}/tune"
    finally:
        if started:
            run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study(tmp_path: Path, postgres_url: str) -> None:
    recipe, out = tiny_tune_recipe(tmp_path), tmp_path / "study"
    command = [
        sys.executable, "-m", "fineserve", "tune", str(recipe), "--trials", str(TRIALS_PER_WORKER),
        "--study", "shared", "--storage", postgres_url, "--output-dir", str(out),
    ]  # fmt: skip
    workers = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=240) for worker in workers]
    finally:
        for worker in workers:  # none outlives the test (and the database stopped under it)
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(2 * TRIALS_PER_WORKER))  # the count adds up, no number twice
    assert all(t.state.is_finished() for t in study.trials)
    # Each worker ran its own trials: the numbers it printed are its share, and the shares are disjoint.
    ran = [{int(line.split()[1].rstrip(":")) for line in printed.splitlines() if line.startswith("trial ")}
           for printed, _ in outputs]  # fmt: skip
    assert [len(r) for r in ran] == [TRIALS_PER_WORKER, TRIALS_PER_WORKER]
    assert ran[0] | ran[1] == set(numbers)
    assert len((out / "trials.csv").read_text().splitlines()) >= 1 + TRIALS_PER_WORKER
