# Sourced by the installers of the tools that tests need (tests/observability/install_prometheus.sh,
# tests/training/install_postgres.sh): `make test` runs them first and stops when one fails,
# since those tests must run, never skip (tests/skip_gate.py).
#
# ensure_debian_package SCRIPT PACKAGE NEEDED_BY FOUND: exits 0 when the command FOUND succeeds,
# else installs PACKAGE with apt-get (as root), then checks FOUND again; a one-line reason and
# exit 1 when it cannot.
ensure_debian_package() {
  local script=$1 package=$2 needed_by=$3 found=$4
  if "$found"; then
    exit 0
  fi
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "$script: $package is missing; install the Debian package '$package' (as root: apt-get install $package)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  install() { apt-get install -y -q --no-install-recommends "$package" >/dev/null; }
  # The package lists may be missing or stale on a fresh machine: update once, then retry.
  if ! install && ! { apt-get update -q >/dev/null && install; }; then
    echo "$script: apt-get install $package failed; $needed_by cannot run" >&2
    exit 1
  fi
  if ! "$found"; then
    echo "$script: the $package package installed, but its commands are still not found" >&2
    exit 1
  fi
  exit 0
}
