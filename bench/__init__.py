"""Benchmarks: edgeweave next to the programs an operator would otherwise run."""
