#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian package `prometheus`) for tests/observability and the
# alert-rule tests when they are missing (tests/debian_package.sh).
set -u
source "$(dirname "$0")/../debian_package.sh"
found() { command -v prometheus >/dev/null && command -v promtool >/dev/null; }
ensure_debian_package install_prometheus prometheus "the observability tests" found
