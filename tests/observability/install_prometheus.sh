#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian package `prometheus`) for tests/observability, when they
# are missing and we can: root, with apt-get. Idempotent, and never fails the build: without the
# binaries those tests skip and say why.
set -u
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "install_prometheus: not root or no apt-get; observability tests that need Prometheus will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
# The package lists may be missing or stale on a fresh machine: update once, then retry.
if ! install && ! { apt-get update -q >/dev/null && install; }; then
  echo "install_prometheus: apt-get install prometheus failed; those tests will skip" >&2
fi
exit 0
