"""Helpers shared by the reliability and integration tests (and benchmarks/faults.py)."""
