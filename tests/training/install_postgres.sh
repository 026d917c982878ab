#!/usr/bin/env bash
# Installs PostgreSQL (Debian package `postgresql`) for the tuning test that runs two workers on
# one study in a real database (tests/training/test_tune_postgres.py), when it is missing. `make
# test` runs it first and stops when it fails: that test must run, never skip
# (tests/skip_gate.py). The test starts its own server in a temporary folder; the package's own
# cluster is not used.
set -u
found() { command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
if found; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "install_postgres: initdb/pg_ctl are missing; install the Debian package 'postgresql' (as root: apt-get install postgresql)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends postgresql >/dev/null; }
# The package lists may be missing or stale on a fresh machine: update once, then retry.
if ! install && ! { apt-get update -q >/dev/null && install; }; then
  echo "install_postgres: apt-get install postgresql failed; the PostgreSQL tuning test cannot run" >&2
  exit 1
fi
if ! found; then
  echo "install_postgres: the postgresql package installed, but initdb is neither on PATH nor in /usr/lib/postgresql/*/bin" >&2
  exit 1
fi
