"""Benchmarks for pgproxy (not part of the installed package)."""
