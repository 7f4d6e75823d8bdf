"""Benchmarks of sphinx-mllm against its peers and the machine limits (see docs/benchmarks.md)."""
