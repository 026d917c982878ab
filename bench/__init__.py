"""Benchmarks: figures printed and written as JSON; not tests."""
