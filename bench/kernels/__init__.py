"""Kernel benchmarks: each names its providers and reports physical units next to a measured ceiling."""
