"""Benchmark scripts: each prints markdown tables; none is a timed test."""
