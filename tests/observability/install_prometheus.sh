#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian package `prometheus`) for tests/observability and the
# alert-rule tests when they are missing. `make test` runs it first and stops when it fails: those
# tests must run, never skip (tests/skip_gate.py).
set -u
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "install_prometheus: prometheus/promtool are missing; install the Debian package 'prometheus' (as root: apt-get install prometheus)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
# The package lists may be missing or stale on a fresh machine: update once, then retry.
if ! install && ! { apt-get update -q >/dev/null && install; }; then
  echo "install_prometheus: apt-get install prometheus failed; the observability tests cannot run" >&2
  exit 1
fi
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "install_prometheus: the prometheus package installed, but prometheus/promtool are not on PATH" >&2
  exit 1
fi
