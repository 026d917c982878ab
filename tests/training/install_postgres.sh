#!/usr/bin/env bash
# Installs PostgreSQL (Debian package `postgresql`) for the tuning test that runs two workers on
# one study in a real database (tests/training/test_tune_postgres.py), when it is missing
# (tests/debian_package.sh). The test starts its own server in a temporary folder; the package's
# own cluster is not used.
set -u
source "$(dirname "$0")/../debian_package.sh"
# Debian keeps initdb and pg_ctl off PATH, in /usr/lib/postgresql/VERSION/bin.
found() { command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
ensure_debian_package install_postgres postgresql "the PostgreSQL tuning test" found
