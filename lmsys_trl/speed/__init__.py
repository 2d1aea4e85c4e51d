"""Throughput measurement (scripts/benchmark.py): random-weight models of real shapes on the real length mix."""
