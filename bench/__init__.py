"""Benchmarks of the kit, run from a checkout (not installed): ratios in one run."""
